//! Secrets out of what walshore prints. A URL may carry a password (`user:pw@`) or a
//! token (a webhook's `?token=…`, a signed query): in every log line, error message and
//! `check` line a URL is shown as scheme, host, port and path only. Log lines pass
//! through [`Scrubbed`], errors through `retry::ErrorChain`, the command line's own
//! messages through [`scrub`]; metric labels never hold URLs. Below every stage, so
//! that configuration can use it too.

use std::borrow::Cow;

/// The URL without credentials, query or fragment: for logs, messages and marks.
pub fn describe_url(u: &url::Url) -> String {
    let mut shown = format!("{}://{}", u.scheme(), u.host_str().unwrap_or(""));
    if let Some(port) = u.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(u.path());
    shown
}

/// `text` with every URL in it shown by [`describe_url`]. A URL runs from its scheme to
/// the first white space, quote or parenthesis (less a sentence's last punctuation).
/// When its token (up to white space or a quote) holds a user, a query or a fragment,
/// nothing of it survives but what [`describe_url`] shows: a URL that does not parse
/// keeps only its scheme, and what follows the URL in the token goes too unless it is
/// only punctuation (`url` does not encode `(`, `)` or `'` in a password or a query).
pub fn scrub(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let start = rest[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |j| j + 1);
        let tail = &rest[i + 3..];
        let token_end = i
            + 3
            + tail
                .find(|c: char| c.is_whitespace() || "\"'<>`\\".contains(c))
                .unwrap_or(tail.len());
        let mut end = i + 3 + rest[i + 3..token_end].find(['(', ')']).unwrap_or(token_end - i - 3);
        // Punctuation that ends a sentence is the sentence's.
        while end > i + 3 && rest[..end].ends_with(['.', ',', ';', ':', '!']) {
            end -= 1;
        }
        out.push_str(&rest[..start]);
        if start == i {
            // "://" with no scheme before it: not a URL.
            out.push_str(&rest[i..i + 3]);
            rest = &rest[i + 3..];
            continue;
        }
        let secretive = rest[i + 3..token_end].contains(['@', '?', '#']);
        let candidate = &rest[start..end];
        match url::Url::parse(candidate) {
            Ok(u) if u.has_host() => out.push_str(&describe_url(&u)),
            Ok(_) => out.push_str(&rest[start..i + 3]),
            Err(_) if secretive => out.push_str(&rest[start..i + 3]),
            Err(_) => out.push_str(candidate),
        }
        let after = &rest[end..token_end];
        rest = if secretive && after.chars().any(|c| c.is_alphanumeric()) {
            &rest[token_end..]
        } else {
            &rest[end..]
        };
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// A log destination that scrubs every line before it reaches `inner` (the formatter
/// writes each event in one piece).
pub struct Scrubbed<W>(pub W);

impl<W: std::io::Write> std::io::Write for Scrubbed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) => {
                self.0.write_all(scrub(text).as_bytes())?;
                Ok(buf.len())
            }
            Err(_) => self.0.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_credentials_or_query() {
        let u = url::Url::parse("https://user:pw@hooks.example.com:8443/in/walshore?token=secret").unwrap();
        assert_eq!(describe_url(&u), "https://hooks.example.com:8443/in/walshore");
        let u = url::Url::parse("http://127.0.0.1/").unwrap();
        assert_eq!(describe_url(&u), "http://127.0.0.1/");
    }

    #[test]
    fn every_url_in_a_text_loses_its_secrets() {
        let cases = [
            (
                "error sending request for url (https://hooks.example.com/in?token=s3cr3t): connection refused",
                "error sending request for url (https://hooks.example.com/in): connection refused",
            ),
            (
                "Error performing PUT http://key:s3cr3t@127.0.0.1:9000/lake/x.parquet?partNumber=1 in 2s",
                "Error performing PUT http://127.0.0.1:9000/lake/x.parquet in 2s",
            ),
            (
                "two: postgres://rep:s3cr3t@db:5432/t?password=s3cr3t and \"http://a/b#s3cr3t\"",
                "two: postgres://db:5432/t and \"http://a/b\"",
            ),
            ("no url here: a://", "no url here: a://"),
            // A URL ends at white space: what follows is text.
            ("cut http://host x?t=1", "cut http://host/ x?t=1"),
            ("odd http://[::1:s3cr3t@host/x?t=s3cr3t", "odd http://host/x"),
            ("unparsable http://u:s3cr3t@[zz]/x?t=s3cr3t", "unparsable http://"),
            ("unparsable http://[zz]/x?t=s3cr3t", "unparsable http://"),
            // Characters a URL may hold unencoded that end the URL here: the rest of its
            // token goes with it.
            ("pw postgres://rep:pa(s3cr3t@db/x end", "pw postgres:// end"),
            ("token https://h/in?token=ab(s3cr3t) end", "token https://h/in end"),
            (
                "quoted 'postgres://rep:s3cr3t@db/x' end",
                "quoted 'postgres://db/x' end",
            ),
        ];
        for (text, shown) in cases {
            assert_eq!(scrub(text), shown, "{text}");
        }
        assert!(matches!(scrub("nothing to do"), Cow::Borrowed(_)));
    }
}
