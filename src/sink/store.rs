//! The object store behind `sink.url`: a local directory (`file://`) or S3 (`s3://`, any
//! S3-compatible endpoint, credentials from the standard AWS chain).

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

use crate::config::SinkConfig;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sink.url {url}: cannot create directory {path}: {source}; check that the path is writable by this user")]
    LocalDir {
        url: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sink.url {url}: {source}")]
    Build {
        url: String,
        #[source]
        source: object_store::Error,
    },
}

/// Opens the store, rooted at the sink URL's path: keys given to it are relative.
pub fn open_store(cfg: &SinkConfig) -> Result<Arc<dyn ObjectStore>, StoreError> {
    let url = cfg.url.to_string();
    match cfg.url.scheme() {
        "file" => {
            let path = cfg.url.to_file_path().map_err(|()| StoreError::LocalDir {
                url: url.clone(),
                path: cfg.url.path().into(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an absolute local path"),
            })?;
            std::fs::create_dir_all(&path).map_err(|source| StoreError::LocalDir {
                url: url.clone(),
                path: path.display().to_string(),
                source,
            })?;
            let fs = LocalFileSystem::new_with_prefix(&path)
                .map_err(|source| StoreError::Build {
                    url: url.clone(),
                    source,
                })?
                // Files are written to a temporary name and renamed: readers never see a
                // partial file.
                .with_automatic_cleanup(true);
            Ok(Arc::new(fs))
        }
        _ => {
            let bucket = cfg.url.host_str().unwrap_or_default();
            // allow_http lives in the client options: set it there, or the options
            // below would reset it.
            let mut client = ClientOptions::new().with_timeout(cfg.request_timeout);
            let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
            if let Some(region) = &cfg.region {
                b = b.with_region(region);
            }
            if let Some(endpoint) = &cfg.endpoint {
                // A custom endpoint is an S3-compatible server: path-style requests, and
                // plain http only when the endpoint itself says http.
                b = b.with_endpoint(endpoint).with_virtual_hosted_style_request(false);
                client = client.with_allow_http(endpoint.starts_with("http://"));
            }
            // object_store retries transient HTTP failures itself (5xx, timeouts,
            // throttling) with exponential backoff; we bound the total time.
            b = b
                .with_retry(RetryConfig {
                    max_retries: 10,
                    retry_timeout: std::time::Duration::from_secs(120),
                    ..RetryConfig::default()
                })
                .with_client_options(client);
            let s3 = b.build().map_err(|source| StoreError::Build {
                url: url.clone(),
                source,
            })?;
            let prefix = cfg.url.path().trim_matches('/');
            if prefix.is_empty() {
                Ok(Arc::new(s3))
            } else {
                Ok(Arc::new(PrefixStore::new(s3, prefix)))
            }
        }
    }
}
