//! A libpq-style connection URL: host, port, user, password, database, `sslmode`,
//! `sslrootcert`, `application_name`, `connect_timeout`. `Debug` never shows the password.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// How walshore proves who it is to PostgreSQL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    /// The password from the URL, `source.password` or `PGPASSWORD`, if the server asks.
    Password,
    /// `source.auth = "iam"`: a fresh IAM token per connection (RDS, Aurora), signed for
    /// `region` (the AWS chain's when `None`) and good for `token_lifetime`.
    Iam {
        region: Option<String>,
        token_lifetime: Duration,
    },
}

/// Connection parameters from a libpq-style URL. `Debug` never shows the password.
#[derive(Clone)]
pub struct ConnParams {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub application_name: String,
    pub connect_timeout: Duration,
    pub auth: Auth,
    /// `source.allow_cleartext_password`: send the password to a server that asks for it
    /// in clear text although its TLS certificate was not verified.
    pub allow_cleartext: bool,
}

impl std::fmt::Debug for ConnParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.redacted())
    }
}

impl ConnParams {
    /// The URL without its password, for logs and messages.
    pub fn redacted(&self) -> String {
        format!("postgres://{}@{}:{}/{}", self.user, self.host, self.port, self.dbname)
    }

    pub fn parse(raw: &str) -> Result<ConnParams, String> {
        let url =
            url::Url::parse(raw).map_err(|e| format!("not a URL ({e}); expected postgres://user@host:5432/dbname"))?;
        if url.scheme() != "postgres" && url.scheme() != "postgresql" {
            return Err(format!("scheme {:?} is not postgres://", url.scheme()));
        }
        let decode = |s: &str| percent_decode(s).ok_or_else(|| "URL has an invalid percent-encoding".to_owned());
        let user = if url.username().is_empty() {
            std::env::var("USER").unwrap_or_else(|_| "postgres".into())
        } else {
            decode(url.username())?
        };
        let mut p = ConnParams {
            host: url
                .host_str()
                .unwrap_or("localhost")
                .trim_matches(['[', ']'])
                .to_owned(),
            port: url.port().unwrap_or(5432),
            dbname: match url.path().trim_start_matches('/') {
                "" => user.clone(),
                db => decode(db)?,
            },
            user,
            password: url.password().map(decode).transpose()?,
            sslmode: SslMode::Prefer,
            sslrootcert: None,
            application_name: "walshore".into(),
            connect_timeout: Duration::from_secs(10),
            auth: Auth::Password,
            allow_cleartext: false,
        };
        for (k, v) in url.query_pairs() {
            match &*k {
                "sslmode" => {
                    p.sslmode = match &*v {
                        "disable" => SslMode::Disable,
                        "allow" | "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        other => {
                            return Err(format!(
                                "sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                            ));
                        }
                    }
                }
                "sslrootcert" => p.sslrootcert = Some(PathBuf::from(&*v)),
                "application_name" => p.application_name = v.into_owned(),
                "connect_timeout" => {
                    let secs: u64 = v
                        .parse()
                        .map_err(|_| format!("connect_timeout {v:?} is not a number of seconds"))?;
                    p.connect_timeout = Duration::from_secs(secs.max(1));
                }
                "password" => p.password = Some(v.into_owned()),
                "user" => p.user = v.into_owned(),
                "host" => p.host = v.into_owned(),
                "port" => p.port = v.parse().map_err(|_| format!("port {v:?} is not a number"))?,
                "dbname" => p.dbname = v.into_owned(),
                other => return Err(format!("unsupported URL parameter {other:?}")),
            }
        }
        if p.password.is_none() {
            p.password = std::env::var("PGPASSWORD").ok();
        }
        Ok(p)
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters (`A-Za-z0-9-._~`),
/// which is also SigV4's URI encoding: a `${VAR}` inside `source.url`, an IAM token.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
