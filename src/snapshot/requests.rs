//! `walshore resnapshot` requests: one object per request under
//! `_walshore/requests/{schema.table}/`, so that a request made while a copy of the table
//! runs is never taken for that copy's: the copy that carries a request out deletes
//! exactly its key once committed, and a later request stays for the next copy.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use object_store::path::{Path, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// Where `walshore resnapshot` leaves its requests.
const REQUESTS: &str = "_walshore/requests";

/// A new request's object for `schema.table` (unique: time and a random part).
pub fn request_key(table: &str) -> Path {
    let name = format!(
        "{:016x}-{:08x}.json",
        crate::checkpoint::record::now_micros(),
        rand::random::<u32>()
    );
    Path::from_iter(
        REQUESTS
            .split('/')
            .map(PathPart::from)
            .chain([PathPart::from(table), PathPart::from(name.as_str())]),
    )
}

/// Asks the pipeline writing to `store` to copy `table` again; returns the request's key.
pub async fn request_resnapshot(store: &dyn ObjectStore, table: &str) -> Result<Path, object_store::Error> {
    let key = request_key(table);
    let body = serde_json::json!({ "table": table, "requested_at": crate::checkpoint::record::now_micros() });
    store.put(&key, PutPayload::from(body.to_string().into_bytes())).await?;
    Ok(key)
}

#[derive(serde::Deserialize)]
struct Request {
    table: String,
}

/// The pending requests: each table with the keys of its requests (an older walshore's
/// `requests/{table}.json` included).
pub async fn requested(store: &dyn ObjectStore) -> Result<BTreeMap<String, Vec<String>>, object_store::Error> {
    let prefix = Path::from(REQUESTS);
    let metas: Vec<_> = store.list(Some(&prefix)).try_collect().await?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in metas {
        let body = match store.get(&m.location).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        match serde_json::from_slice::<Request>(&body) {
            Ok(r) => out.entry(r.table).or_default().push(m.location.to_string()),
            Err(e) => tracing::warn!(key = %m.location, error = %e, "ignoring an unreadable resnapshot request"),
        }
    }
    Ok(out)
}

/// Whether a request is still there (not yet carried out).
pub async fn pending(store: &dyn ObjectStore, key: &Path) -> Result<bool, object_store::Error> {
    match store.head(key).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}
