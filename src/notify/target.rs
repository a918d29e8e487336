//! Where notices go: an HTTP webhook (a JSON POST, optionally signed) or an SNS topic
//! (the standard AWS credential chain; FIFO topics get a deduplication id).

use std::time::Duration;

use hmac::{KeyInit, Mac};

use super::Notice;
use crate::retry::ErrorChain;

pub enum Target {
    Webhook {
        client: reqwest::Client,
        url: url::Url,
        secret: Option<String>,
    },
    Sns {
        client: aws_sdk_sns::Client,
        arn: String,
        fifo: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("cannot build the webhook's HTTP client: {0}")]
    Client(String),
}

/// `X-Walshore-Signature` of `body` sent at `timestamp` (`X-Walshore-Timestamp`, Unix
/// seconds) under `secret`: `sha256=` and the HMAC-SHA256 in hex of `{timestamp}.` and
/// the body. The time is signed with the body, so a receiver that refuses old
/// timestamps cannot be sent a captured notice again later.
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl Target {
    pub fn webhook(url: url::Url, secret: Option<String>, timeout: Duration) -> Result<Target, TargetError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("walshore/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| TargetError::Client(e.to_string()))?;
        Ok(Target::Webhook { client, url, secret })
    }

    /// A client in the topic's region, from the standard AWS chain.
    pub async fn sns(arn: &str, endpoint: Option<&str>, timeout: Duration) -> Target {
        let region = crate::config::sns_region(arn)
            .expect("checked by the config")
            .to_owned();
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region))
            .load()
            .await;
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .operation_attempt_timeout(timeout)
            .connect_timeout(timeout)
            .build();
        let mut b = aws_sdk_sns::config::Builder::from(&conf).timeout_config(timeouts);
        if let Some(ep) = endpoint {
            b = b.endpoint_url(ep);
        }
        Target::Sns {
            client: aws_sdk_sns::Client::from_conf(b.build()),
            arn: arn.to_owned(),
            fifo: arn.ends_with(".fifo"),
        }
    }

    /// The label of its metrics and its key in the marks.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Webhook { .. } => "webhook",
            Target::Sns { .. } => "sns",
        }
    }

    /// Where it sends, safe to log.
    pub fn address(&self) -> String {
        match self {
            Target::Webhook { url, .. } => super::describe_url(url),
            Target::Sns { arn, .. } => arn.clone(),
        }
    }

    /// Delivers one notice (`body` is `notice.body()`).
    pub async fn send(&self, notice: &Notice, body: &[u8]) -> Result<(), String> {
        let id = format!("{}-{}-{}", notice.system_id, notice.slot, notice.seq);
        match self {
            Target::Webhook { client, url, secret } => {
                let mut req = client
                    .post(url.clone())
                    .header("content-type", "application/json")
                    .header("idempotency-key", &id)
                    .header("x-walshore-seq", notice.seq.to_string())
                    .body(body.to_vec());
                if let Some(s) = secret {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    req = req
                        .header("x-walshore-timestamp", now.to_string())
                        .header("x-walshore-signature", signature(s, now, body));
                }
                // reqwest's error text carries the URL, token and all: not in our logs.
                let resp = req.send().await.map_err(|e| ErrorChain(&e.without_url()).to_string())?;
                let status = resp.status();
                if status.is_success() {
                    return Ok(());
                }
                let text = resp.text().await.unwrap_or_default();
                let text: String = text.chars().take(200).collect();
                Err(format!("the webhook answered {status}: {text}"))
            }
            Target::Sns { client, arn, fifo } => {
                let tables = serde_json::to_string(&notice.table_names()).expect("names serialize");
                let attr = |t: &str, v: String| {
                    aws_sdk_sns::types::MessageAttributeValue::builder()
                        .data_type(t)
                        .string_value(v)
                        .build()
                        .expect("data type set")
                };
                let mut req = client
                    .publish()
                    .topic_arn(arn)
                    .message(String::from_utf8_lossy(body))
                    .message_attributes("tables", attr("String.Array", tables))
                    .message_attributes("seq", attr("Number", notice.seq.to_string()));
                if *fifo {
                    // In order per slot; SNS drops a resend within its 5-minute window.
                    req = req.message_group_id(&notice.slot).message_deduplication_id(&id);
                }
                req.send().await.map(|_| ()).map_err(|e| {
                    let e = aws_sdk_sns::Error::from(e);
                    format!("SNS Publish to {arn}: {}", ErrorChain(&e))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_timestamp_and_the_body() {
        // RFC 4231, test case 2, the timestamp and its dot being the first bytes of the
        // data: "1733500000." + "what do ya want for nothing?" under "Jefe".
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let plain = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(
            plain,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let signed = signature("Jefe", 1_733_500_000, b"what do ya want for nothing?");
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"1733500000.what do ya want for nothing?");
        assert_eq!(signed, format!("sha256={}", hex::encode(mac.finalize().into_bytes())));
        // Another time, another signature: a replay with a fresh timestamp fails.
        assert_ne!(
            signed,
            signature("Jefe", 1_733_500_001, b"what do ya want for nothing?")
        );
    }
}
