//! Runs of audit records stored as one value: the cache's outbox and the
//! control plane's log keep records in chunks (key: the number of the first
//! record) so that one store write carries hundreds of records. A store's
//! per-write cost (node copies, transaction bookkeeping) is what limited the
//! audit path when each record was its own key.
//!
//! Format, version 1: `0x01`, the record count (u32, big-endian), then each
//! record as its length (u32, big-endian) and its bytes. A value that does
//! not start with `0x01` is a single record stored on its own (the layout
//! before chunks, still written for lone records): audit records are JSON
//! objects, which never start with that byte.

/// First byte of a version-1 chunk.
pub const CHUNK_V1: u8 = 0x01;
/// Records per chunk at most.
pub const MAX_CHUNK_RECORDS: usize = 1024;
/// Bytes of records per chunk at most. Small enough that a store node
/// holding a few chunks stays an ordinary page (sled writes pages above
/// 128 KiB as separate blob files).
pub const MAX_CHUNK_BYTES: usize = 6 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored audit chunk is malformed: {0}")]
pub struct ChunkError(&'static str);

/// Encodes `records` as one chunk; a single record is stored as it is.
pub fn encode<R: AsRef<[u8]>>(records: &[R]) -> Vec<u8> {
    if let [one] = records
        && one.as_ref().first() != Some(&CHUNK_V1)
    {
        return one.as_ref().to_vec();
    }
    let len: usize = records.iter().map(|r| r.as_ref().len() + 4).sum();
    let mut out = Vec::with_capacity(5 + len);
    out.push(CHUNK_V1);
    out.extend_from_slice(&(records.len() as u32).to_be_bytes());
    for r in records {
        let r = r.as_ref();
        out.extend_from_slice(&(r.len() as u32).to_be_bytes());
        out.extend_from_slice(r);
    }
    out
}

fn read_u32(buf: &[u8], at: usize) -> Result<usize, ChunkError> {
    let b: [u8; 4] = buf
        .get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .ok_or(ChunkError("truncated length"))?;
    Ok(u32::from_be_bytes(b) as usize)
}

/// The records of a stored value, borrowed from it.
pub fn decode(value: &[u8]) -> Result<Vec<&[u8]>, ChunkError> {
    if value.first() != Some(&CHUNK_V1) {
        return Ok(vec![value]);
    }
    let count = read_u32(value, 1)?;
    // Each record takes at least its 4-byte length: a count larger than
    // that is corrupt, and is never used to size an allocation.
    if count > (value.len() - 5) / 4 {
        return Err(ChunkError("record count exceeds the chunk"));
    }
    let mut out = Vec::with_capacity(count);
    let mut at = 5;
    for _ in 0..count {
        let len = read_u32(value, at)?;
        at += 4;
        let r = value
            .get(at..at.checked_add(len).ok_or(ChunkError("record length"))?)
            .ok_or(ChunkError("record runs past the chunk"))?;
        out.push(r);
        at += len;
    }
    if at != value.len() {
        return Err(ChunkError("trailing bytes after the last record"));
    }
    Ok(out)
}

/// Splits `records` into runs that each fit one chunk (at least one record
/// per run, however large).
pub fn split<R: AsRef<[u8]>>(records: &[R]) -> Vec<&[R]> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < records.len() {
        let mut bytes = 0;
        let mut end = start;
        while end < records.len() && end - start < MAX_CHUNK_RECORDS {
            let len = records[end].as_ref().len() + 4;
            if end > start && bytes + len > MAX_CHUNK_BYTES {
                break;
            }
            bytes += len;
            end += 1;
        }
        out.push(&records[start..end]);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_lone_records() {
        let recs: Vec<Vec<u8>> = (0..5)
            .map(|i| format!("{{\"n\":{i}}}").into_bytes())
            .collect();
        let v = encode(&recs);
        assert_eq!(v[0], CHUNK_V1);
        let back = decode(&v).expect("decodes");
        assert_eq!(back, recs.iter().map(|r| r.as_slice()).collect::<Vec<_>>());
        // One record is stored as it is: the layout before chunks.
        assert_eq!(encode(&recs[..1]), recs[0]);
        assert_eq!(decode(&recs[0]).expect("lone"), vec![recs[0].as_slice()]);
        // Even an empty record survives.
        let odd = vec![Vec::new(), b"{}".to_vec()];
        assert_eq!(decode(&encode(&odd)).expect("decodes").len(), 2);
        // A lone record that starts with the chunk byte is chunked.
        let tricky = vec![vec![CHUNK_V1, 2, 3]];
        assert_eq!(
            decode(&encode(&tricky)).expect("decodes"),
            vec![&[1u8, 2, 3][..]]
        );
    }

    #[test]
    fn malformed_chunks_are_refused() {
        let v = encode(&[b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]);
        for cut in 1..v.len() {
            assert!(decode(&v[..cut]).is_err(), "truncated at {cut}");
        }
        let mut longer = v.clone();
        longer.push(0);
        assert!(decode(&longer).is_err(), "trailing byte");
        let mut huge = v.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&huge).is_err(), "count beyond the chunk");
        let mut long_rec = v;
        long_rec[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&long_rec).is_err(), "record beyond the chunk");
    }

    #[test]
    fn split_bounds_records_and_bytes() {
        let small: Vec<Vec<u8>> = vec![vec![b'x'; 10]; 3000];
        let runs = split(&small);
        assert!(runs.iter().all(|r| r.len() <= MAX_CHUNK_RECORDS));
        assert!(
            runs.iter()
                .all(|r| r.iter().map(|x| x.len() + 4).sum::<usize>() <= MAX_CHUNK_BYTES)
        );
        assert_eq!(runs.iter().map(|r| r.len()).sum::<usize>(), 3000);
        let big: Vec<Vec<u8>> = vec![vec![b'y'; MAX_CHUNK_BYTES + 1]; 2];
        assert_eq!(
            split(&big).len(),
            2,
            "an oversized record gets a chunk of its own"
        );
        assert!(split::<Vec<u8>>(&[]).is_empty());
    }
}
