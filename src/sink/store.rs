//! The object store behind `sink.url`: a local directory (`file://`) or S3 (`s3://`, any
//! S3-compatible endpoint, credentials from the standard AWS chain).

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    ClientOptions, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, RetryConfig,
};

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
                .with_automatic_cleanup(true)
                // Durable before confirmed: every write is fsynced with its directories
                // before it returns, as an S3 PUT is durable when it returns.
                .with_fsync(true);
            Ok(Arc::new(DurableLocal { fs }))
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
            // Every PUT and multipart upload carries the encryption headers: data files
            // and the commit log alike.
            let key = |name: &str| name.parse::<AmazonS3ConfigKey>().expect("an object_store S3 key");
            match &cfg.sse {
                None => {}
                Some(crate::config::Sse::S3) => {
                    b = b.with_config(key("aws_server_side_encryption"), "AES256");
                }
                Some(crate::config::Sse::Kms { key_id, bucket_key }) => {
                    b = b
                        .with_config(key("aws_server_side_encryption"), "aws:kms")
                        .with_bucket_key(*bucket_key);
                    if let Some(id) = key_id {
                        b = b.with_config(key("aws_sse_kms_key_id"), id);
                    }
                }
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

/// The local lake: `LocalFileSystem` with fsync, whose deletes are durable too (it fsyncs
/// only writes). A deleted pending record must not come back after a power loss: it
/// would name files that a later commit published (see `checkpoint::pending`).
#[derive(Debug)]
struct DurableLocal {
    fs: LocalFileSystem,
}

impl std::fmt::Display for DurableLocal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Durable{}", self.fs)
    }
}

/// fsyncs the directory that held `path` (or, once automatic cleanup removed it, the
/// nearest one that still exists).
fn sync_parent(path: &std::path::Path) -> std::io::Result<()> {
    let mut dir = path.parent();
    while let Some(d) = dir {
        match std::fs::File::open(d) {
            Ok(f) => return f.sync_all(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => dir = d.parent(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl ObjectStore for DurableLocal {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.fs.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.fs.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.fs.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        self.fs.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let fs = self.fs.clone();
        self.fs
            .delete_stream(locations)
            .then(move |deleted| {
                let fs = fs.clone();
                async move {
                    let location = deleted?;
                    let file = fs.path_to_filesystem(&location)?;
                    tokio::task::spawn_blocking(move || sync_parent(&file))
                        .await
                        .map_err(|e| object_store::Error::JoinError { source: e })?
                        .map_err(|e| object_store::Error::Generic {
                            store: "LocalFileSystem",
                            source: Box::new(e),
                        })?;
                    Ok(location)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.fs.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.fs.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.fs.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.fs.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> object_store::Result<()> {
        self.fs.rename_opts(from, to, options).await
    }
}
