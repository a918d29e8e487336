//! IAM database authentication (`source.auth = "iam"`): instead of a password, each
//! connection sends a token that RDS or Aurora checks against IAM. A token is a SigV4
//! presigned `https://{host}:{port}/?Action=connect&DBUser={user}` for the `rds-db`
//! service, without its scheme. It is good for one login within its lifetime (at most
//! 15 minutes); a session that logged in keeps running after its token expired. So
//! walshore signs a fresh one for every connection, including every reconnect, and never
//! keeps one.
//!
//! Credentials come from the standard AWS chain (environment, profile, web identity, ECS
//! task role, instance profile), loaded once and refreshed by the SDK before they expire.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::ProvideCredentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign};
use aws_sigv4::sign::v4;
use tokio::sync::OnceCell;

use crate::config::{Auth, ConnParams, percent_encode};

/// RDS accepts tokens that live at most this long.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// The AWS chain's credentials and region, loaded on the first IAM connection.
static AWS: OnceCell<aws_types::SdkConfig> = OnceCell::const_new();

/// The password to log in with: `p`'s own, or with `source.auth = "iam"` a token
/// signed now. Call it once per connection.
pub async fn password(p: &ConnParams) -> Result<Option<String>, String> {
    match &p.auth {
        Auth::Password => Ok(p.password.clone()),
        Auth::Iam { region, token_lifetime } => token(p, region.as_deref(), *token_lifetime).await.map(Some),
    }
}

/// A fresh token for `p`'s host, port and user, signed now.
async fn token(p: &ConnParams, region: Option<&str>, lifetime: Duration) -> Result<String, String> {
    let conf = AWS
        .get_or_init(|| async {
            let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
            if let Some(r) = region {
                loader = loader.region(aws_config::Region::new(r.to_owned()));
            }
            loader.load().await
        })
        .await;
    let region = match region {
        Some(r) => r.to_owned(),
        None => conf.region().map(|r| r.to_string()).ok_or(
            "source.auth = \"iam\" needs the database's AWS region: set source.region or AWS_REGION".to_owned(),
        )?,
    };
    let provider = conf.credentials_provider().ok_or(
        "source.auth = \"iam\" found no AWS credentials provider; give the task a role or set AWS_ACCESS_KEY_ID"
            .to_owned(),
    )?;
    let creds = provider.provide_credentials().await.map_err(|e| {
        format!(
            "source.auth = \"iam\": no AWS credentials to sign the database token ({e}); give the task a role allowed rds-db:connect, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    })?;
    presign(
        &creds,
        &Request {
            region: &region,
            service: "rds-db",
            url: &format!(
                "https://{}:{}/?Action=connect&DBUser={}",
                p.host,
                p.port,
                percent_encode(&p.user)
            ),
            body: SignableBody::Bytes(&[]),
        },
        SystemTime::now(),
        lifetime,
    )
}

/// What a presigned URL signs.
struct Request<'a> {
    region: &'a str,
    service: &'a str,
    /// Already percent-encoded.
    url: &'a str,
    body: SignableBody<'a>,
}

/// The URL of `req` signed at `time` for `lifetime`, without its `https://`.
fn presign(creds: &Credentials, req: &Request<'_>, time: SystemTime, lifetime: Duration) -> Result<String, String> {
    let identity = creds.clone().into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(lifetime);
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(req.region)
        .name(req.service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| format!("signing the database token: {e}"))?
        .into();
    let signable = SignableRequest::new("GET", req.url, std::iter::empty(), req.body.clone())
        .map_err(|e| format!("signing the database token: {e}"))?;
    let (_, query) = sign(signable, &params)
        .map_err(|e| format!("signing the database token: {e}"))?
        .into_parts()
        .0
        .into_parts();
    let mut out = req.url.strip_prefix("https://").unwrap_or(req.url).to_owned();
    for (name, value) in query {
        out.push(if out.contains('?') { '&' } else { '?' });
        out.push_str(name);
        out.push('=');
        out.push_str(&percent_encode(&value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y_m_d_h_m_s: &str) -> SystemTime {
        humantime::parse_rfc3339(y_m_d_h_m_s).unwrap()
    }

    /// AWS's documented presigned-URL example ("Authenticating Requests: Using Query
    /// Parameters (AWS Signature Version 4)", Amazon S3 API reference): the same SigV4
    /// query signing an RDS token uses, with S3's unsigned payload.
    #[test]
    fn signs_aws_documented_presigned_url_example() {
        let creds = Credentials::new(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            None,
            None,
            "example",
        );
        let url = presign(
            &creds,
            &Request {
                region: "us-east-1",
                service: "s3",
                url: "https://examplebucket.s3.amazonaws.com/test.txt",
                body: SignableBody::UnsignedPayload,
            },
            at("2013-05-24T00:00:00Z"),
            Duration::from_secs(86400),
        )
        .unwrap();
        assert_eq!(
            url,
            "examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request\
             &X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host\
             &X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
        );
    }

    /// The shape AWS documents for `aws rds generate-db-auth-token` (host:port, Action,
    /// DBUser, 900 s, rds-db scope), and a session token signed into it.
    #[test]
    fn rds_token_has_the_documented_shape() {
        let creds = Credentials::new("AKIDEXAMPLE", "secret", Some("tok/en+=".into()), None, "example");
        let token = presign(
            &creds,
            &Request {
                region: "us-east-1",
                service: "rds-db",
                url: "https://db.example.us-east-1.rds.amazonaws.com:5432/?Action=connect&DBUser=walshore",
                body: SignableBody::Bytes(&[]),
            },
            at("2018-07-31T23:52:09Z"),
            MAX_TOKEN_LIFETIME,
        )
        .unwrap();
        let prefix = "db.example.us-east-1.rds.amazonaws.com:5432/?Action=connect&DBUser=walshore\
                      &X-Amz-Algorithm=AWS4-HMAC-SHA256\
                      &X-Amz-Credential=AKIDEXAMPLE%2F20180731%2Fus-east-1%2Frds-db%2Faws4_request\
                      &X-Amz-Date=20180731T235209Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&";
        assert!(token.starts_with(prefix), "{token}");
        let mut rest: Vec<&str> = token[prefix.len()..].split('&').collect();
        rest.sort();
        assert_eq!(rest.len(), 2, "{token}");
        assert_eq!(rest[0], "X-Amz-Security-Token=tok%2Fen%2B%3D");
        let sig = rest[1].strip_prefix("X-Amz-Signature=").unwrap();
        assert!(sig.len() == 64 && sig.bytes().all(|b| b.is_ascii_hexdigit()), "{sig}");
    }

    #[test]
    fn encodes_as_sigv4_does() {
        assert_eq!(percent_encode("a-Z_0.~"), "a-Z_0.~");
        assert_eq!(percent_encode("a b/c+d=é"), "a%20b%2Fc%2Bd%3D%C3%A9");
    }
}
