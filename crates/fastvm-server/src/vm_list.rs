//! `GET /v1/vms` at scale: the list of an org's VMs, whole (the spec's plain
//! JSON array) or a page of it (the extension `limit` / `cursor`).
//!
//! What one list costs, and how each part is kept small:
//!
//! ```text
//!   API key           Store::authenticate: cached by token hash for 1 s (store/keys.rs)
//!   rows              Store::list_vm_entries: one query, one row of text back
//!                     (id, version, status, created_at_ms, worker per VM), not
//!                     the full rows: no per-row driver hand-off, no JSON columns
//!   worker state      running / paused VMs only; one Worker::list per worker
//!                     (Worker::state when it has one such VM), not one call per VM
//!   JSON              each VM's view serialised once per row version (ViewCache);
//!                     a miss (new VM, changed row, status moved by the worker)
//!                     reads the full rows of the misses in one query
//!   body              the cached views joined into one `[...]`
//! ```
//!
//! The whole list (no `limit` / `cursor`) is cached too ([`ListCache`]), per
//! org and status filter, with the org's list generation it was built at
//! ([`crate::store::Store::vm_list_generation`]: database triggers move it
//! on every write of one of the org's VM rows, from any control plane). A
//! request reads the generation (one primary-key lookup, before anything
//! else) and, when it is the cached list's and the workers still report
//! the cached running / paused VMs in their cached status, answers the
//! cached body without reading the rows. Anything else rebuilds the list
//! as above (a reconciliation it writes moves the generation again). Large
//! cached answers are also kept gzip-compressed, made once per cached list,
//! for clients that accept it (`Accept-Encoding: gzip`: httpx, browsers,
//! fetch): ~805 KB of JSON for 1,000 VMs is what bounds the whole list.
//!
//! A cached view is keyed by (VM id, row version): every write to a VM row
//! bumps its version ([`crate::store::Store::update_vm`] and every other
//! `UPDATE vms`), and so does every change to its volume attachments (the
//! other input of the view), so a view of the listed version is the view of
//! the VM as it is.
//!
//! Pages: `limit` (1..=1000) VMs from `cursor` on, in the list's order
//! (oldest first, then by id); the cursor of the next page comes in the
//! [`NEXT_CURSOR_HEADER`] response header (absent on the last page), so the
//! body stays the spec's plain array. A cursor is the last VM's
//! (created_at_ms, id) in 48 hex digits, opaque to clients. Keyset
//! pagination: a VM that exists for the whole walk is on exactly one page,
//! whatever is created or deleted meanwhile.

use crate::error::{codes, ApiError};
use crate::routes::vms::view;
use crate::store::{VmListCursor, VmListEntry, VmRecord};
use crate::worker::{VmState, WorkerError};
use crate::AppState;
use bytes::Bytes;
use fastvm_types::{OrgId, VmId, VmStatus};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The response header that carries the cursor of the next page.
pub const NEXT_CURSOR_HEADER: &str = "x-next-cursor";

/// The largest `limit` of a page.
pub const MAX_LIMIT: u32 = 1000;

/// Most views cached at once (about 1 KB each); past it the cache starts over.
const VIEW_CACHE_MAX: usize = 20_000;

/// Serialised views of VMs by id, each valid for one row version.
#[derive(Default)]
pub(crate) struct ViewCache {
    entries: Mutex<HashMap<VmId, (i64, Bytes)>>,
}

impl ViewCache {
    /// The cached view of each entry's row version, where there is one.
    fn lookup(&self, entries: &[VmListEntry]) -> Vec<Option<Bytes>> {
        let Ok(cache) = self.entries.lock() else {
            return vec![None; entries.len()];
        };
        entries
            .iter()
            .map(|e| match cache.get(&e.id) {
                Some((version, json)) if *version == e.version => Some(json.clone()),
                _ => None,
            })
            .collect()
    }

    fn put(&self, id: VmId, version: i64, json: Bytes) {
        if let Ok(mut cache) = self.entries.lock() {
            if cache.len() >= VIEW_CACHE_MAX {
                cache.clear();
            }
            cache.insert(id, (version, json));
        }
    }
}

/// Most whole lists cached at once (one per org and status filter).
const LIST_CACHE_MAX: usize = 4096;

/// Answers at least this large are also served gzip-compressed.
pub const GZIP_MIN_BYTES: usize = 8 << 10;

/// Whole lists of `GET /v1/vms`, by org and status filter, each valid for
/// one list generation (see the module docs).
#[derive(Default)]
pub(crate) struct ListCache {
    lists: Mutex<HashMap<ListKey, Arc<CachedList>>>,
}

/// A whole list: an org's VMs, only those in a status when given.
type ListKey = (OrgId, Option<VmStatus>);

/// One whole list as answered.
pub struct CachedList {
    /// The org's list generation read before the list was built.
    generation: i64,
    /// Its running and paused VMs, as listed: their workers are asked on
    /// every hit (a VM that died moves the list).
    live: Vec<VmListEntry>,
    body: Bytes,
    /// `body` gzip-compressed, made on the first request that accepts it.
    gzip: OnceLock<Bytes>,
}

impl CachedList {
    /// The body gzip-compressed (made once, off the async threads).
    pub async fn gzip(self: &Arc<Self>) -> Result<Bytes, ApiError> {
        if let Some(g) = self.gzip.get() {
            return Ok(g.clone());
        }
        let me = self.clone();
        let g = tokio::task::spawn_blocking(move || gzip(&me.body))
            .await
            .map_err(|e| ApiError::internal(format!("compressing the VM list: {e}")))?
            .map_err(|e| ApiError::internal(format!("compressing the VM list: {e}")))?;
        Ok(self.gzip.get_or_init(|| g).clone())
    }
}

fn gzip(body: &[u8]) -> std::io::Result<Bytes> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 8),
        flate2::Compression::default(),
    );
    enc.write_all(body)?;
    Ok(Bytes::from(enc.finish()?))
}

/// Whether an `Accept-Encoding` value accepts gzip (a `gzip` or `*` coding
/// whose q is not 0).
pub fn accepts_gzip(accept_encoding: &str) -> bool {
    accept_encoding.split(',').any(|coding| {
        let mut parts = coding.split(';').map(str::trim);
        let name = parts.next().unwrap_or("");
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
    })
}

impl ListCache {
    fn get(&self, org: OrgId, status: Option<VmStatus>) -> Option<Arc<CachedList>> {
        self.lists.lock().ok()?.get(&(org, status)).cloned()
    }

    fn put(&self, org: OrgId, status: Option<VmStatus>, list: Arc<CachedList>) {
        if let Ok(mut lists) = self.lists.lock() {
            if lists.len() >= LIST_CACHE_MAX {
                lists.clear();
            }
            lists.insert((org, status), list);
        }
    }
}

/// The cursor that continues a list after `c`.
pub fn encode_cursor(c: VmListCursor) -> String {
    // The bits of the i64, so any value round-trips.
    format!("{:016x}{}", c.created_at_ms as u64, c.id.0.simple())
}

/// A cursor of [`encode_cursor`], or 400 `INVALID_CURSOR`.
pub fn decode_cursor(s: &str) -> Result<VmListCursor, ApiError> {
    let bad = || {
        ApiError::invalid(
            codes::INVALID_CURSOR,
            format!(
                "cursor {:?} is not a cursor of GET /v1/vms: pass the X-Next-Cursor header of the previous page unchanged, or leave cursor out for the first page",
                s.chars().take(64).collect::<String>()
            ),
        )
    };
    if s.len() != 48 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let created = u64::from_str_radix(&s[..16], 16).map_err(|_| bad())?;
    let id = s[16..].parse::<VmId>().map_err(|_| bad())?;
    Ok(VmListCursor {
        created_at_ms: created as i64,
        id,
    })
}

/// The `limit` query parameter: absent is no limit; else an integer in
/// 1..=[`MAX_LIMIT`], or 400 `INVALID_LIMIT` (`limit=` too: the document
/// types it as an integer).
pub fn parse_limit(raw: Option<&str>) -> Result<Option<u32>, ApiError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    match raw.parse::<u32>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(Some(n)),
        _ => Err(ApiError::invalid(
            codes::INVALID_LIMIT,
            format!(
                "limit {:?} is not a number of VMs from 1 to {MAX_LIMIT}: give e.g. limit=100, or leave it out for the whole list",
                raw.chars().take(64).collect::<String>()
            ),
        )),
    }
}

/// A list (or page) as the response body, and the next page's cursor.
pub struct VmListPage {
    /// A JSON array of `Vm`.
    pub body: Bytes,
    pub next_cursor: Option<String>,
    /// The whole list as cached (its gzip form can be asked of it).
    pub cached: Option<Arc<CachedList>>,
}

impl AppState {
    /// The live VMs of `org` (only those in `status` when given), each
    /// reconciled with its worker, as a JSON array: all of them, or at most
    /// `limit` from `after` on (see the module docs).
    pub(crate) async fn list_vm_page(
        &self,
        org: OrgId,
        status: Option<VmStatus>,
        after: Option<VmListCursor>,
        limit: Option<u32>,
    ) -> Result<VmListPage, ApiError> {
        let whole = after.is_none() && limit.is_none();
        // Read before the rows: a write after it moves the generation, so
        // the list built below is at least as new as the generation says.
        let generation = if whole {
            let generation = self.store().vm_list_generation(org).await?;
            if let Some(hit) = self.cached_list(org, status, generation).await {
                return Ok(VmListPage {
                    body: hit.body.clone(),
                    next_cursor: None,
                    cached: Some(hit),
                });
            }
            Some(generation)
        } else {
            None
        };
        // One more than asked: whether a next page exists.
        let mut entries = self
            .store()
            .list_vm_entries(org, status, after, limit.map(|l| l.saturating_add(1)))
            .await?;
        let next_cursor = match limit {
            Some(l) if entries.len() > l as usize => {
                entries.truncate(l as usize);
                entries.last().map(|e| encode_cursor(e.cursor()))
            }
            _ => None,
        };
        let mut reports = self.worker_reports(&entries).await;
        let cached = self.inner_views().lookup(&entries);
        // Full rows for views not cached, and for VMs whose worker says
        // their status moved (reconciliation writes the row).
        let moved =
            |e: &VmListEntry, reports: &HashMap<VmId, Result<Option<VmState>, WorkerError>>| matches!(reports.get(&e.id), Some(Ok(state)) if crate::lifecycle::observed(state.clone()).0 != e.status);
        let need: Vec<VmId> = entries
            .iter()
            .zip(&cached)
            .filter(|(e, c)| c.is_none() || moved(e, &reports))
            .map(|(e, _)| e.id)
            .collect();
        let mut rows: HashMap<VmId, VmRecord> = if need.is_empty() {
            HashMap::new()
        } else {
            self.store()
                .get_vms(org, &need)
                .await?
                .into_iter()
                .map(|r| (r.id, r))
                .collect()
        };
        // The volume attachments of the VMs whose view is built here.
        let mut attachments = if rows.is_empty() {
            HashMap::new()
        } else {
            let ids: Vec<VmId> = rows.keys().copied().collect();
            self.store().attachments_of_vms(&ids).await?
        };
        let mut bucket_mounts = if rows.is_empty() {
            HashMap::new()
        } else {
            let ids: Vec<VmId> = rows.keys().copied().collect();
            self.store().bucket_mounts_of_vms(&ids).await?
        };
        let mut parts: Vec<Bytes> = Vec::with_capacity(entries.len());
        for (e, c) in entries.iter().zip(cached) {
            if let Some(json) = c.filter(|_| !moved(e, &reports)) {
                parts.push(json);
                continue;
            }
            // Not there any more: deleted since the entries were read.
            let Some(rec) = rows.remove(&e.id) else {
                continue;
            };
            let rec = match reports.remove(&e.id) {
                Some(reported) => self.reconciled_with(rec, reported).await?,
                None => self.reconciled(rec).await?,
            };
            // Reconciliation may have moved it out of the filter.
            if status.is_some_and(|s| s != rec.status) {
                continue;
            }
            let mut vm = view(&rec);
            vm.volumes = attachments
                .remove(&rec.id)
                .unwrap_or_default()
                .into_iter()
                .map(crate::volumes::item_of)
                .collect();
            vm.bucket_mounts = bucket_mounts
                .remove(&rec.id)
                .unwrap_or_default()
                .into_iter()
                .map(crate::bucket_mounts::view_of)
                .collect();
            let json = Bytes::from(
                serde_json::to_vec(&vm)
                    .map_err(|e| ApiError::internal(format!("encoding VM {}: {e}", rec.id)))?,
            );
            self.inner_views().put(rec.id, rec.version, json.clone());
            parts.push(json);
        }
        let mut body = Vec::with_capacity(2 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
        body.push(b'[');
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(p);
        }
        body.push(b']');
        let body = Bytes::from(body);
        let cached = generation.map(|generation| {
            let list = Arc::new(CachedList {
                generation,
                live: entries
                    .into_iter()
                    .filter(|e| matches!(e.status, VmStatus::Running | VmStatus::Paused))
                    .collect(),
                body: body.clone(),
                gzip: OnceLock::new(),
            });
            self.inner_lists().put(org, status, list.clone());
            list
        });
        Ok(VmListPage {
            body,
            next_cursor,
            cached,
        })
    }

    /// The cached whole list of `org` (in `status`), if it was built at
    /// `generation` and its workers still report its running and paused
    /// VMs in the status it lists.
    async fn cached_list(
        &self,
        org: OrgId,
        status: Option<VmStatus>,
        generation: i64,
    ) -> Option<Arc<CachedList>> {
        let list = self.inner_lists().get(org, status)?;
        if list.generation != generation {
            return None;
        }
        let reports = self.worker_reports(&list.live).await;
        let moved = list.live.iter().any(|e| {
            matches!(reports.get(&e.id), Some(Ok(state)) if crate::lifecycle::observed(state.clone()).0 != e.status)
        });
        (!moved).then_some(list)
    }

    /// What the workers report about the running and paused VMs of
    /// `entries` (the others are not asked): one `list` per worker, or
    /// `state` when it has one such VM. A worker that cannot say gives
    /// every VM of it that error (the list keeps what the store knows).
    async fn worker_reports(
        &self,
        entries: &[VmListEntry],
    ) -> HashMap<VmId, Result<Option<VmState>, WorkerError>> {
        let mut by_worker: HashMap<&str, Vec<VmId>> = HashMap::new();
        for e in entries {
            if matches!(e.status, VmStatus::Running | VmStatus::Paused) {
                by_worker.entry(&e.worker_id).or_default().push(e.id);
            }
        }
        let mut out = HashMap::new();
        for (worker_id, ids) in by_worker {
            let worker = match self.worker_for(worker_id).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(worker = worker_id, error = %e, vms = ids.len(), "the VMs' worker cannot be reached to report their state");
                    out.extend(ids.into_iter().map(|id| (id, Err(e.clone()))));
                    continue;
                }
            };
            if let [id] = ids[..] {
                out.insert(id, worker.state(id).await);
                continue;
            }
            match worker.list().await {
                Ok(listed) => {
                    let known: HashMap<VmId, VmState> = listed.into_iter().collect();
                    out.extend(ids.into_iter().map(|id| (id, Ok(known.get(&id).cloned()))));
                }
                Err(e) => {
                    tracing::warn!(worker = worker_id, error = %e, vms = ids.len(), "the VMs' worker did not report their state");
                    out.extend(ids.into_iter().map(|id| (id, Err(e.clone()))));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_bad_ones_are_400() {
        for created_at_ms in [0, 1, 1_764_000_000_000, -5, i64::MAX, i64::MIN] {
            let c = VmListCursor {
                created_at_ms,
                id: VmId::new_v4(),
            };
            let s = encode_cursor(c);
            assert_eq!(s.len(), 48);
            assert_eq!(decode_cursor(&s).ok(), Some(c));
        }
        let good = encode_cursor(VmListCursor {
            created_at_ms: 7,
            id: VmId::new_v4(),
        });
        for bad in [
            "",
            "abc",
            &good[1..],
            &format!("{good}0"),
            &good.replacen('0', "g", 1),
            "ééééééééééééééééééééééééé",
        ] {
            let e = decode_cursor(bad)
                .err()
                .map(|e| (e.status, e.code.to_owned()));
            assert_eq!(
                e,
                Some((axum::http::StatusCode::BAD_REQUEST, "INVALID_CURSOR".into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn limits_are_1_to_1000() {
        assert_eq!(parse_limit(None).ok(), Some(None));
        assert_eq!(parse_limit(Some("1")).ok(), Some(Some(1)));
        assert_eq!(parse_limit(Some("1000")).ok(), Some(Some(1000)));
        for bad in [
            "",
            "0",
            "1001",
            "-1",
            "ten",
            "1.5",
            " 5",
            "99999999999999999999",
        ] {
            let e = parse_limit(Some(bad)).err();
            assert_eq!(
                e.map(|e| (e.status, e.code.to_owned())),
                Some((axum::http::StatusCode::BAD_REQUEST, "INVALID_LIMIT".into())),
                "{bad:?}"
            );
        }
    }
}
