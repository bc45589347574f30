//! Audit records forwarded by caches: appended to the audit log once each,
//! wrapped with the sender's authenticated id.

use lattice_shared::id::SpiffeId;
use lattice_shared::limits::MAX_AUDIT_RECORD_BYTES;
use lattice_shared::proto as pb;
use lattice_shared::store::Write;

use crate::{Error, State};

const T_HWM: &str = "audit_hwm";
/// Records one batch may carry.
pub const MAX_RECORDS: usize = 1024;
const KINDS: [&str; 7] = [
    "issued",
    "leased",
    "refused",
    "delegated",
    "proxy_use",
    "proxy_refused",
    "outbox_pressure",
];

fn key(cache: &SpiffeId, epoch: u64) -> Vec<u8> {
    format!("{cache}#{epoch:016x}").into_bytes()
}

pub fn hwm(state: &State, cache: &SpiffeId, epoch: u64) -> Result<u64, Error> {
    Ok(lattice_shared::eventlog::read_seq(
        &*state.store,
        T_HWM,
        &key(cache, epoch),
    )?)
}

/// Records queued at one link's audit worker at most: a cache keeps
/// far fewer in flight (its window), so more is a misbehaving peer.
pub const MAX_QUEUED: u64 = 64 * 1024;

/// Kinds of record that say the sender used a secret: it must hold it.
const USES_SECRET: [&str; 2] = ["leased", "proxy_use"];

/// The leaves of one batch after `hwm`, validated and stamped with the
/// sender, what detection reads of them (borrowed from the batch), and
/// the new mark.
pub struct Prepared<'a> {
    pub leaves: Vec<Vec<u8>>,
    pub observed: Vec<crate::detect::Record<'a>>,
    /// Records beyond the sender's authority, not appended: (number, why).
    pub refused: Vec<(u64, String)>,
    /// Numbers the sender skipped (first, last): recorded as an
    /// `audit_gap` leaf, never a reason to drop the link.
    pub gap: Option<(u64, u64)>,
    pub upto: u64,
}

impl Prepared<'_> {
    /// Secrets the records say the sender used.
    fn secrets_used(&self) -> impl Iterator<Item = &str> {
        self.observed
            .iter()
            .filter(|r| USES_SECRET.contains(&&*r.kind))
            .map(|r| &*r.secret)
    }

    /// Refuses the records that used a secret not in `held`.
    fn refuse_unheld(&mut self, held: &std::collections::HashSet<String>, first_seq: &[u64]) {
        let mut keep = Vec::with_capacity(self.observed.len());
        for (i, r) in self.observed.iter().enumerate() {
            let ok = !USES_SECRET.contains(&&*r.kind) || held.contains(&*r.secret);
            if !ok {
                self.refused.push((
                    first_seq[i],
                    format!("it does not hold the secret {:?}", r.secret),
                ));
            }
            keep.push(ok);
        }
        let mut k = keep.iter();
        self.leaves.retain(|_| *k.next().unwrap_or(&true));
        let mut k = keep.iter();
        self.observed.retain(|_| *k.next().unwrap_or(&true));
    }
}

/// Why a record about `agent` is beyond `cache`'s authority (`None`: it
/// is within): an agent id of the cache's own trust domain and region.
fn outside_authority(cache: &SpiffeId, agent: &str) -> Option<String> {
    if agent.is_empty() {
        return None;
    }
    match SpiffeId::parse(agent) {
        Ok(id)
            if id.role() == lattice_shared::id::Role::Agent
                && id.trust_domain() == cache.trust_domain()
                && id.region() == cache.region() =>
        {
            None
        }
        _ => Some(format!("{agent:?} is not an agent of its region")),
    }
}

/// The leaf of a record: `{"cache":…,"cache_seq":…,` then the record's
/// own fields. Written directly rather than through a JSON tree: this
/// runs for every record of every cache.
fn stamp(cache: &SpiffeId, seq: u64, record: &[u8]) -> Result<Vec<u8>, Error> {
    let body = record.trim_ascii_start();
    let rest = body
        .strip_prefix(b"{")
        .ok_or_else(|| Error::InvalidArgument("record is not a JSON object".into()))?;
    let mut leaf = Vec::with_capacity(record.len() + cache.as_str().len() + 40);
    leaf.extend_from_slice(b"{\"cache\":");
    serde_json::to_writer(&mut leaf, cache.as_str()).map_err(|e| Error::Corrupt(e.to_string()))?;
    leaf.extend_from_slice(b",\"cache_seq\":");
    leaf.extend_from_slice(seq.to_string().as_bytes());
    if !rest.trim_ascii_start().starts_with(b"}") {
        leaf.push(b',');
    }
    leaf.extend_from_slice(rest);
    Ok(leaf)
}

/// Whether `text` holds a `\\uD800`–`\\uDFFF` escape. serde does not check
/// the escapes of values it skips, and a lone surrogate makes the leaf
/// unreadable as JSON; caches write every character as UTF-8, so any
/// surrogate escape (paired or not) is refused.
fn has_surrogate_escape(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if b.get(i + 1) == Some(&b'u')
                && matches!(b.get(i + 2), Some(b'd' | b'D'))
                && matches!(b.get(i + 3), Some(b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F'))
            {
                return true;
            }
            i += 2; // the escaped character, whatever it is
        } else {
            i += 1;
        }
    }
    false
}

/// The leaf that records a gap in a cache's numbers.
fn gap_leaf(cache: &SpiffeId, from: u64, to: u64) -> Result<Vec<u8>, Error> {
    let mut leaf = Vec::with_capacity(300);
    leaf.extend_from_slice(b"{\"cache\":");
    serde_json::to_writer(&mut leaf, cache.as_str()).map_err(|e| Error::Corrupt(e.to_string()))?;
    leaf.extend_from_slice(
        format!(
            ",\"cache_seq\":{to},\"kind\":\"audit_gap\",\"from\":{from},\"to\":{to},\
             \"reason\":\"the cache sent records from {} on: the ones before were acknowledged by \
             a control plane whose log this one does not hold (restored from an older copy?), or \
             the cache lost them\"}}",
            to + 1
        )
        .as_bytes(),
    );
    Ok(leaf)
}

/// Checks a batch against the mark and turns its new records into
/// leaves (the sender is the certificate's id: a record that names a
/// cache itself is refused).
pub fn prepare<'a>(
    cache: &'a SpiffeId,
    hwm: u64,
    batch: &'a pb::AuditBatch,
) -> Result<Prepared<'a>, Error> {
    if batch.records.len() > MAX_RECORDS {
        return Err(Error::InvalidArgument(format!(
            "more than {MAX_RECORDS} records"
        )));
    }
    if batch.first == 0 {
        return Err(Error::InvalidArgument("record numbers start at 1".into()));
    }
    let mut leaves = Vec::new();
    // Numbers after the mark that the sender no longer has (the control
    // plane was restored from an older copy and lost records it had
    // acked, or the cache lost them): the log says so in a leaf of its
    // own ([`gap_leaf`]), and both sides go on. Revocations share this
    // stream; audit never takes it down.
    let gap = (batch.first > hwm + 1).then(|| (hwm + 1, batch.first - 1));
    let hwm = hwm.max(batch.first - 1);
    let skip = usize::try_from(hwm + 1 - batch.first).unwrap_or(usize::MAX);
    let mut observed = Vec::new();
    let mut refused = Vec::new();
    let mut upto = hwm;
    for (i, r) in batch.records.iter().enumerate().skip(skip) {
        let seq = batch.first + i as u64;
        if r.len() > MAX_AUDIT_RECORD_BYTES {
            return Err(Error::InvalidArgument(format!(
                "record {seq} is larger than {MAX_AUDIT_RECORD_BYTES} bytes"
            )));
        }
        // UTF-8 first: serde skips the values of fields it does not read
        // without checking them, and the leaf must be JSON all through.
        let text = std::str::from_utf8(r)
            .map_err(|e| Error::InvalidArgument(format!("record {seq} is not UTF-8 JSON: {e}")))?;
        if has_surrogate_escape(text) {
            return Err(Error::InvalidArgument(format!(
                "record {seq} holds a \\u surrogate escape (write such characters as UTF-8)"
            )));
        }
        let mut rec: crate::detect::Record<'a> = serde_json::from_str(text).map_err(|e| {
            Error::InvalidArgument(format!("record {seq} is not an audit record: {e}"))
        })?;
        if !KINDS.contains(&&*rec.kind) {
            return Err(Error::InvalidArgument(format!(
                "record {seq}: kind {:?} is not one a cache sends",
                rec.kind
            )));
        }
        if rec.claimed_cache.is_some() || rec.claimed_cache_seq.is_some() {
            return Err(Error::InvalidArgument(format!(
                "record {seq} names a cache itself; the control plane sets that"
            )));
        }
        upto = seq;
        if let Some(why) = outside_authority(cache, &rec.agent) {
            refused.push((seq, why));
            continue;
        }
        leaves.push(stamp(cache, seq, r)?);
        rec.cache = std::borrow::Cow::Borrowed(cache.as_str());
        rec.seq = seq;
        observed.push(rec);
    }
    Ok(Prepared {
        leaves,
        observed,
        refused,
        gap,
        upto,
    })
}

/// Appends prepared leaves (one or more batches, in order) and the new
/// mark in one durable write through the group committer, then runs
/// detection on them.
pub async fn commit(
    state: &std::sync::Arc<State>,
    cache: &SpiffeId,
    epoch: u64,
    prepared: Vec<Prepared<'_>>,
) -> Result<(), Error> {
    let Some(upto) = prepared.last().map(|p| p.upto) else {
        return Ok(());
    };
    let mut prepared = prepared;
    // Records of a secret's use must come from a holder: the secrets they
    // name are looked up once per commit, off the async threads.
    let named: std::collections::HashSet<String> = prepared
        .iter()
        .flat_map(|p| p.secrets_used())
        .map(str::to_owned)
        .collect();
    if !named.is_empty() {
        let (st, me) = (state.clone(), cache.to_string());
        let held = tokio::task::spawn_blocking(move || {
            named
                .into_iter()
                .filter_map(|n| match st.cache_holds_secret(&me, &n) {
                    Ok(true) => Some(Ok(n)),
                    Ok(false) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<std::collections::HashSet<String>, Error>>()
        })
        .await
        .map_err(|_| Error::Internal("audit worker failed".into()))??;
        for p in &mut prepared {
            let seqs: Vec<u64> = p.observed.iter().map(|r| r.seq).collect();
            p.refuse_unheld(&held, &seqs);
        }
    }
    let mut leaves = Vec::new();
    let mut observed = Vec::new();
    let mut refused = Vec::new();
    for p in prepared {
        if let Some((from, to)) = p.gap {
            tracing::warn!(cache_id = %cache, from, to, "audit records missing from a cache's numbers: recorded as an audit_gap, the link goes on");
            metrics::counter!("lattice_cp_audit_gaps_total", "cache" => cache.to_string())
                .increment(1);
            leaves.push(gap_leaf(cache, from, to)?);
        }
        leaves.extend(p.leaves);
        observed.extend(p.observed);
        refused.extend(p.refused);
    }
    let n = leaves.len() as u64;
    // Refused records leave no leaf; one alert a commit names the sender.
    // The mark moves past them: the cache is not asked for them again.
    let mut alerts = Vec::new();
    if let Some((seq, why)) = refused.first() {
        metrics::counter!("lattice_cp_audit_records_refused_total", "cache" => cache.to_string())
            .increment(refused.len() as u64);
        if let Some(a) = state.detector.outside_authority(
            cache,
            refused.len(),
            *seq,
            why,
            state.clock.now_unix_ms(),
        ) {
            tracing::warn!(cache_id = %cache, refused = refused.len(), first = seq, reason = %why, "audit records beyond the sending cache's authority refused");
            alerts.push(a);
        }
    } else if leaves.is_empty() {
        return Ok(()); // all held already
    }
    state
        .commit_audit(
            leaves,
            vec![Write {
                tree: T_HWM,
                key: key(cache, epoch),
                value: Some(upto.to_be_bytes().to_vec()),
            }],
        )
        .await?;
    metrics::counter!("lattice_cp_audit_records_total", "cache" => cache.to_string()).increment(n);
    // Durable first, then looked at: an alert never names a record the
    // log could lose.
    alerts.extend(observed.iter().flat_map(|r| state.detector.observe(r)));
    if !alerts.is_empty() {
        crate::detect::raise(state, alerts).await?;
    }
    Ok(())
}

/// One link's audit worker: takes the batches the stream reader hands
/// over, commits whatever queued meanwhile as one write, and acks.
/// Runs beside the stream so that revocations going down never wait
/// for an audit commit.
pub async fn worker(
    state: std::sync::Arc<State>,
    cache: SpiffeId,
    epoch: u64,
    queued: std::sync::Arc<std::sync::atomic::AtomicU64>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<pb::AuditBatch>,
    tx: super::Downlink,
) -> String {
    use std::sync::atomic::Ordering;
    let _held = state.links.audit_lock(&cache).lock_owned().await;
    let mut hwm = {
        let (st, id) = (state.clone(), cache.clone());
        match tokio::task::spawn_blocking(move || hwm(&st, &id, epoch)).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => return format!("reading the audit mark failed: {e}"),
            Err(_) => return "audit worker failed".into(),
        }
    };
    let ack = pb::SyncDown {
        msg: Some(super::Down::AuditAck(pb::AuditAck { upto: hwm })),
    };
    if let Err(why) = tx.send(Ok(ack)).await {
        return why;
    }
    while let Some(first) = rx.recv().await {
        let mut batches = vec![first];
        while let Ok(b) = rx.try_recv() {
            batches.push(b);
        }
        let n: u64 = batches.iter().map(|b| b.records.len() as u64).sum();
        let mut prepared = Vec::with_capacity(batches.len());
        let mut mark = hwm;
        for b in &batches {
            match prepare(&cache, mark, b) {
                Ok(p) => {
                    mark = p.upto;
                    prepared.push(p);
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(tonic::Status::invalid_argument(format!(
                            "audit batch: {e}"
                        ))))
                        .await;
                    return format!("bad audit batch: {e}");
                }
            }
        }
        if let Err(e) = commit(&state, &cache, epoch, prepared).await {
            let _ = tx
                .send(Err(tonic::Status::unavailable(format!(
                    "audit records not stored: {e}"
                ))))
                .await;
            return format!("audit commit failed: {e}");
        }
        queued.fetch_sub(n, Ordering::Relaxed);
        hwm = mark;
        let ack = pb::SyncDown {
            msg: Some(super::Down::AuditAck(pb::AuditAck { upto: hwm })),
        };
        if let Err(why) = tx.send(Ok(ack)).await {
            return why;
        }
    }
    "stream closed".into()
}

/// The control plane's reading of audit batches from caches, for the fuzz
/// targets in `fuzz/` (not an API).
#[doc(hidden)]
pub mod fuzzing {
    use prost::Message;

    use super::*;

    /// Decodes `bytes` as an `AuditBatch` from the `eu` cache `c1`, prepares
    /// it after `hwm`, and checks what must hold of every accepted record:
    /// its leaf is a JSON object that names the sender and the record's
    /// number, and nothing else can claim otherwise. Panics only when that
    /// fails.
    pub fn audit_batch(hwm: u64, bytes: &[u8]) {
        let Ok(batch) = pb::AuditBatch::decode(bytes) else {
            return;
        };
        let Ok(cache) = SpiffeId::parse("spiffe://fuzz.test/cache/eu/c1") else {
            return;
        };
        let Ok(p) = prepare(&cache, hwm, &batch) else {
            return;
        };
        assert_eq!(p.leaves.len(), p.observed.len());
        for (leaf, rec) in p.leaves.iter().zip(&p.observed) {
            let v: serde_json::Value =
                serde_json::from_slice(leaf).expect("an accepted record's leaf is JSON");
            assert_eq!(v["cache"], cache.as_str(), "the leaf names its sender");
            assert_eq!(v["cache_seq"], rec.seq, "the leaf names its number");
            assert_eq!(v["kind"], &*rec.kind, "detection reads what the leaf says");
            assert_eq!(v["agent"].as_str().unwrap_or(""), &*rec.agent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(first: u64, records: &[&str]) -> pb::AuditBatch {
        pb::AuditBatch {
            first,
            records: records.iter().map(|r| r.as_bytes().to_vec()).collect(),
        }
    }

    #[test]
    fn leaves_carry_the_sender_and_its_number() {
        let c = SpiffeId::parse("spiffe://t/cache/eu/c1").expect("id");
        let b = batch(
            5,
            &[
                r#"{"kind":"issued","agent":"spiffe://t/agent/eu/a","at_unix_ms":7}"#,
                r#" { "kind" : "refused" , "reason":"x\"y" } "#,
            ],
        );
        let p = prepare(&c, 4, &b).expect("prepared");
        assert_eq!(p.upto, 6);
        let v: Vec<serde_json::Value> = p
            .leaves
            .iter()
            .map(|l| serde_json::from_slice(l).expect("a leaf is JSON"))
            .collect();
        assert_eq!(v[0]["cache"], "spiffe://t/cache/eu/c1");
        assert_eq!(v[0]["cache_seq"], 5);
        assert_eq!(v[0]["at_unix_ms"], 7);
        assert_eq!(v[1]["cache_seq"], 6);
        assert_eq!(v[1]["reason"], "x\"y");
        assert_eq!(p.observed[0].cache, "spiffe://t/cache/eu/c1");
        assert_eq!(p.observed[0].agent, "spiffe://t/agent/eu/a");
        // Records the control plane holds already are skipped.
        let p = prepare(&c, 5, &b).expect("prepared");
        assert_eq!((p.leaves.len(), p.upto), (1, 6));
    }

    #[test]
    fn records_about_agents_beyond_the_senders_region_leave_no_leaf() {
        let c = SpiffeId::parse("spiffe://t/cache/eu/c1").expect("id");
        let b = batch(
            1,
            &[
                r#"{"kind":"refused","agent":"spiffe://t/agent/us/x"}"#,
                r#"{"kind":"issued","agent":"spiffe://t/agent/eu/a"}"#,
                r#"{"kind":"issued","agent":"spiffe://other/agent/eu/a"}"#,
                r#"{"kind":"issued","agent":"spiffe://t/admin/bootstrap"}"#,
            ],
        );
        let p = prepare(&c, 0, &b).expect("prepared");
        assert_eq!(p.leaves.len(), 1);
        assert_eq!(p.observed[0].agent, "spiffe://t/agent/eu/a");
        assert_eq!(
            p.refused.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![1, 3, 4]
        );
        assert_eq!(p.upto, 4, "the mark moves past refused records");
    }

    #[test]
    fn bad_records_are_refused() {
        let c = SpiffeId::parse("spiffe://t/cache/eu/c1").expect("id");
        for bad in [
            r#"{"kind":"issued","cache":"spiffe://t/cache/us/other"}"#,
            r#"{"kind":"issued","cache_seq":1}"#,
            r#"{"kind":"alert"}"#,
            r#"{"agent":"a"}"#,
            r#"["issued"]"#,
            r#"{"kind":"issued"} trailing"#,
            r#"{"kind":"issued","at_unix_ms":"soon"}"#,
            "not json",
        ] {
            assert!(prepare(&c, 0, &batch(1, &[bad])).is_err(), "{bad}");
        }
        let pressure = r#"{"kind":"outbox_pressure","held":80,"max":100,"at_unix_ms":1}"#;
        let b = batch(1, &[pressure]);
        let p = prepare(&c, 0, &b).expect("a cache's own pressure record");
        assert_eq!((p.observed[0].held, p.observed[0].max), (80, 100));
        let ok = r#"{"kind":"issued"}"#;

        assert!(
            prepare(&c, 0, &batch(0, &[ok])).is_err(),
            "numbers start at 1"
        );
    }

    /// A control plane restored from an older copy asks for records the
    /// cache has already trimmed: the gap is recorded and the batch taken
    /// (it used to end the stream that carries revocations, again and
    /// again: issue #19).
    #[test]
    fn a_gap_in_a_caches_numbers_is_recorded_and_the_batch_taken() {
        let c = SpiffeId::parse("spiffe://t/cache/eu/c1").expect("id");
        let ok = r#"{"kind":"issued"}"#;
        let b = batch(116_185, &[ok, ok]);
        let p = prepare(&c, 116_180, &b).expect("a gap is no error");
        assert_eq!(
            (p.gap, p.upto, p.leaves.len()),
            (Some((116_181, 116_184)), 116_186, 2)
        );
        let leaf: serde_json::Value =
            serde_json::from_slice(&gap_leaf(&c, 116_181, 116_184).expect("leaf")).expect("json");
        assert_eq!(
            (&leaf["kind"], &leaf["cache"], &leaf["from"], &leaf["to"]),
            (
                &"audit_gap".into(),
                &c.as_str().into(),
                &116_181.into(),
                &116_184.into()
            )
        );
        let overlap = batch(2, &[ok, ok]);
        let none = prepare(&c, 3, &overlap).expect("an overlap");
        assert_eq!((none.gap, none.upto, none.leaves.len()), (None, 3, 0));
    }

    /// Found by the `sync_up` fuzz target: serde skips an unknown field's
    /// value without checking its UTF-8, so such a record became a leaf of
    /// the audit log that no JSON reader can read.
    #[test]
    fn a_record_that_is_not_utf8_is_refused_even_in_a_field_nobody_reads() {
        let c = SpiffeId::parse("spiffe://t/cache/eu/c1").expect("id");
        let mut r = br#"{"kind":"issued","note":"x"}"#.to_vec();
        let at = r.iter().position(|b| *b == b'x').expect("x");
        r[at] = 0x87;
        let b = pb::AuditBatch {
            first: 1,
            records: vec![r],
        };
        assert!(prepare(&c, 0, &b).is_err());
    }

    /// Found in review: `"cache":null` read as no claim, and a reader that
    /// keeps the last of duplicate keys then saw no sender; a lone surrogate
    /// escape in a field nobody reads made a leaf no JSON reader accepts.
    #[test]
    fn a_record_cannot_null_its_sender_or_smuggle_a_lone_surrogate() {
        let c = SpiffeId::parse("spiffe://t/cache/eu/c1").expect("id");
        for bad in [
            r#"{"kind":"issued","cache":null}"#,
            r#"{"kind":"issued","cache_seq":null}"#,
            r#"{"kind":"issued","note":"\ud800"}"#,
            r#"{"kind":"issued","note":"\uDFFF x"}"#,
            r#"{"kind":"issued","note":"\ud83d\ude00"}"#,
        ] {
            assert!(prepare(&c, 0, &batch(1, &[bad])).is_err(), "{bad}");
        }
        // A backslash that is itself escaped is text; other escapes are fine.
        for ok in [
            r#"{"kind":"issued","note":"\\ud800"}"#,
            r#"{"kind":"issued","note":"\u00e9\n"}"#,
        ] {
            let b = batch(1, &[ok]);
            let p = prepare(&c, 0, &b).unwrap_or_else(|e| panic!("{ok}: {e}"));
            let _: serde_json::Value = serde_json::from_slice(&p.leaves[0]).expect("JSON");
        }
    }
}
