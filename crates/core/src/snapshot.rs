//! The on-disk form of the node table.
//!
//! ```text
//! magic "CCTLTBL\0" (8) | format version u16 LE | payload length u32 LE | crc32 of payload u32 LE | payload
//! ```
//! The payload is postcard of the records. A corrupt or unknown-version file gives a precise
//! error; it is never silently read as an empty table. Writing the file atomically (temp file,
//! fsync, rename, fsync directory) is the runtime's job.

use crate::table::NodeRecord;

/// First bytes of every snapshot file.
pub const MAGIC: &[u8; 8] = b"CCTLTBL\0";
/// The format this build writes and reads.
pub const FORMAT_VERSION: u16 = 3;
/// Largest payload accepted (a full table of large records fits well below this).
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;
const HEADER_LEN: usize = 8 + 2 + 4 + 4;

/// Why a snapshot could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("file is {0} bytes, shorter than the {HEADER_LEN}-byte header")]
    Truncated(usize),
    #[error("not a clusterctl node-table snapshot (bad magic)")]
    BadMagic,
    #[error(
        "snapshot format version {0} is not supported by this build (supports {FORMAT_VERSION})"
    )]
    UnknownVersion(u16),
    #[error("payload length {claimed} does not match the {actual} bytes present")]
    Length { claimed: usize, actual: usize },
    #[error("payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("checksum mismatch: the file is corrupt")]
    Checksum,
    #[error("payload does not decode: {0}")]
    Decode(String),
    #[error("record {index} breaks a bound: {problem}")]
    Record { index: usize, problem: String },
}

/// Encodes records into a snapshot file image.
pub fn encode(records: &[NodeRecord]) -> Vec<u8> {
    let payload = postcard::to_allocvec(records).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes and validates a snapshot file image.
pub fn decode(bytes: &[u8]) -> Result<Vec<NodeRecord>, SnapshotError> {
    if bytes.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated(bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::UnknownVersion(version));
    }
    let claimed = u32::from_le_bytes([bytes[10], bytes[11], bytes[12], bytes[13]]) as usize;
    let crc = u32::from_le_bytes([bytes[14], bytes[15], bytes[16], bytes[17]]);
    if claimed > MAX_PAYLOAD {
        return Err(SnapshotError::TooLarge(claimed));
    }
    let payload = &bytes[HEADER_LEN..];
    if payload.len() != claimed {
        return Err(SnapshotError::Length {
            claimed,
            actual: payload.len(),
        });
    }
    if crc32fast::hash(payload) != crc {
        return Err(SnapshotError::Checksum);
    }
    let records: Vec<NodeRecord> =
        postcard::from_bytes(payload).map_err(|e| SnapshotError::Decode(e.to_string()))?;
    for (index, r) in records.iter().enumerate() {
        r.validate().map_err(|e| SnapshotError::Record {
            index,
            problem: e.to_string(),
        })?;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::tests::rec;
    use proptest::prelude::*;

    #[test]
    fn round_trips() {
        let recs = vec![rec("a", "s", 3), rec("b", "s", 9)];
        assert_eq!(decode(&encode(&recs)).unwrap(), recs);
    }

    #[test]
    fn corruption_is_reported_not_ignored() {
        let mut img = encode(&[rec("a", "s", 3)]);
        let last = img.len() - 1;
        img[last] ^= 0xff;
        assert_eq!(decode(&img), Err(SnapshotError::Checksum));
        assert_eq!(decode(&img[..5]), Err(SnapshotError::Truncated(5)));
        let mut v = encode(&[]);
        v[8] = 9;
        assert_eq!(decode(&v), Err(SnapshotError::UnknownVersion(9)));
        assert_eq!(
            decode(b"garbage-garbage-garbage"),
            Err(SnapshotError::BadMagic)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
            let mut img = MAGIC.to_vec();
            img.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            img.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            img.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
            img.extend_from_slice(&bytes);
            let _ = decode(&img);
        }
    }
}
