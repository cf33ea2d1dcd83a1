//! The write-ahead log of the embedded queue.
//!
//! Records are appended to segment files named after their first sequence number
//! (`00000000000000000001.wal`). Each record is framed as
//!
//! ```text
//! u32 LE payload length | u32 LE crc32(seq ‖ payload) | u64 LE seq | payload
//! ```
//!
//! A record is durable once [`Wal::sync`] returns. Appends are batched by the caller
//! (group commit): many records, one `fdatasync`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

const HEADER: usize = 16;
/// Records larger than this are refused on write and treated as corruption on read.
pub const MAX_RECORD_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("wal i/o on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("wal segment {path} is corrupt at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("wal record of {0} bytes exceeds the limit of {MAX_RECORD_BYTES} bytes")]
    TooLarge(usize),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One record read back during replay.
#[derive(Debug)]
pub struct WalRecord {
    pub seq: u64,
    pub payload: Vec<u8>,
}

struct Segment {
    first_seq: u64,
    /// Last sequence number written to it (first_seq - 1 when empty).
    last_seq: u64,
    path: PathBuf,
}

/// An open write-ahead log.
pub struct Wal {
    dir: PathBuf,
    /// Closed segments, oldest first.
    closed: Vec<Segment>,
    active: Segment,
    file: File,
    active_bytes: u64,
    segment_bytes: u64,
    next_seq: u64,
    buf: Vec<u8>,
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.wal"))
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

impl Wal {
    /// Opens the log in `dir`, reading back every record.
    ///
    /// A torn record at the end of the newest segment (a crash during a write, so never
    /// acknowledged) is cut off. Corruption anywhere else is an error naming the file
    /// and offset. New records get sequence numbers above both the log's and
    /// `min_next_seq` (the caller passes one past the highest sequence already stored
    /// in blocks, since segments are deleted once flushed).
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        min_next_seq: u64,
    ) -> Result<(Wal, Vec<WalRecord>), WalError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut firsts: Vec<u64> = fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".wal")?.parse::<u64>().ok()
            })
            .collect();
        firsts.sort_unstable();

        let mut records = Vec::new();
        let mut closed = Vec::new();
        let mut next_seq = min_next_seq.max(1);
        for (i, &first) in firsts.iter().enumerate() {
            let path = segment_path(dir, first);
            let is_last = i + 1 == firsts.len();
            let (mut recs, valid_len, torn) = read_segment(&path)?;
            if let Some(reason) = torn {
                if !is_last {
                    return Err(WalError::Corrupt {
                        path,
                        offset: valid_len,
                        reason,
                    });
                }
                tracing::warn!(path = %path.display(), offset = valid_len, %reason,
                    "cutting a torn record off the end of the write-ahead log (it was never acknowledged)");
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                f.set_len(valid_len).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))?;
            }
            let last_seq = recs.last().map_or(first.saturating_sub(1), |r| r.seq);
            next_seq = next_seq.max(last_seq + 1);
            records.append(&mut recs);
            closed.push(Segment {
                first_seq: first,
                last_seq,
                path,
            });
        }

        let active_path = segment_path(dir, next_seq);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&active_path)
            .map_err(io_err(&active_path))?;
        sync_dir(dir)?;
        let wal = Wal {
            dir: dir.to_owned(),
            closed,
            active: Segment {
                first_seq: next_seq,
                last_seq: next_seq - 1,
                path: active_path,
            },
            file,
            active_bytes: 0,
            segment_bytes,
            next_seq,
            buf: Vec::with_capacity(1 << 20),
        };
        Ok((wal, records))
    }

    /// Appends a record to the write buffer and returns its sequence number. It is
    /// durable only after the next [`Wal::sync`].
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, WalError> {
        if payload.len() > MAX_RECORD_BYTES {
            return Err(WalError::TooLarge(payload.len()));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&seq.to_le_bytes());
        crc.update(payload);
        self.buf
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&crc.finalize().to_le_bytes());
        self.buf.extend_from_slice(&seq.to_le_bytes());
        self.buf.extend_from_slice(payload);
        self.active.last_seq = seq;
        Ok(seq)
    }

    /// Writes buffered records and waits until they are on disk.
    pub fn sync(&mut self) -> Result<(), WalError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let path = &self.active.path;
        self.file.write_all(&self.buf).map_err(io_err(path))?;
        self.file.sync_data().map_err(io_err(path))?;
        self.active_bytes += self.buf.len() as u64;
        self.buf.clear();
        if self.active_bytes >= self.segment_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    /// Closes the active segment (if it holds anything) and starts a new one, so that
    /// everything written so far can be deleted once flushed. Returns the last
    /// sequence number written.
    pub fn rotate(&mut self) -> Result<u64, WalError> {
        self.sync()?;
        let last = self.next_seq - 1;
        if self.active.last_seq < self.active.first_seq {
            return Ok(last);
        }
        let path = segment_path(&self.dir, self.next_seq);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        sync_dir(&self.dir)?;
        let old = std::mem::replace(
            &mut self.active,
            Segment {
                first_seq: self.next_seq,
                last_seq: self.next_seq - 1,
                path,
            },
        );
        self.file = file;
        self.active_bytes = 0;
        self.closed.push(old);
        Ok(last)
    }

    /// Deletes closed segments whose records are all at or below `seq` (they are in
    /// durable blocks).
    pub fn truncate_through(&mut self, seq: u64) -> Result<(), WalError> {
        let keep_from = self
            .closed
            .iter()
            .position(|s| s.last_seq > seq)
            .unwrap_or(self.closed.len());
        for seg in self.closed.drain(..keep_from) {
            fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
        }
        if keep_from > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Number of segment files on disk.
    pub fn segments(&self) -> usize {
        self.closed.len() + 1
    }
}

/// Reads a segment: its records, the length of its valid prefix, and why reading
/// stopped early (if it did).
fn read_segment(path: &Path) -> Result<(Vec<WalRecord>, u64, Option<String>), WalError> {
    let file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut out = Vec::new();
    let mut offset = 0u64;
    loop {
        if offset == len {
            return Ok((out, offset, None));
        }
        if len - offset < HEADER as u64 {
            return Ok((out, offset, Some("truncated record header".into())));
        }
        let mut header = [0u8; HEADER];
        r.read_exact(&mut header).map_err(io_err(path))?;
        let n = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let seq = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        if n > MAX_RECORD_BYTES {
            return Ok((
                out,
                offset,
                Some(format!("record length {n} over the limit")),
            ));
        }
        if len - offset - (HEADER as u64) < n as u64 {
            return Ok((out, offset, Some("truncated record payload".into())));
        }
        let mut payload = vec![0u8; n];
        r.read_exact(&mut payload).map_err(io_err(path))?;
        let mut h = crc32fast::Hasher::new();
        h.update(&seq.to_le_bytes());
        h.update(&payload);
        if h.finalize() != crc {
            return Ok((
                out,
                offset,
                Some(format!("checksum mismatch for seq {seq}")),
            ));
        }
        offset += (HEADER + n) as u64;
        out.push(WalRecord { seq, payload });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> (Wal, Vec<WalRecord>) {
        Wal::open(dir, 1 << 20, 0).unwrap()
    }

    #[test]
    fn records_survive_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, recs) = open(dir.path());
        assert!(recs.is_empty());
        assert_eq!(wal.append(b"one").unwrap(), 1);
        assert_eq!(wal.append(b"two").unwrap(), 2);
        wal.sync().unwrap();
        drop(wal);
        let (mut wal, recs) = open(dir.path());
        let got: Vec<_> = recs.iter().map(|r| (r.seq, r.payload.clone())).collect();
        assert_eq!(got, vec![(1, b"one".to_vec()), (2, b"two".to_vec())]);
        assert_eq!(wal.append(b"three").unwrap(), 3);
    }

    #[test]
    fn unsynced_records_are_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(dir.path());
        wal.append(b"kept").unwrap();
        wal.sync().unwrap();
        wal.append(b"lost").unwrap();
        drop(wal);
        let (_, recs) = open(dir.path());
        assert_eq!(recs.len(), 1);
    }

    #[test]
    fn torn_tail_is_cut_and_later_records_append_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(dir.path());
        wal.append(b"good").unwrap();
        wal.append(b"torn-record").unwrap();
        wal.sync().unwrap();
        let path = wal.active.path.clone();
        drop(wal);
        let len = fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let (mut wal, recs) = open(dir.path());
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].payload, b"good");
        let seq = wal.append(b"after").unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (_, recs) = open(dir.path());
        assert_eq!(recs.last().unwrap().seq, seq);
        assert_eq!(recs.len(), 2);
    }

    #[test]
    fn corruption_in_an_old_segment_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(dir.path());
        wal.append(b"first").unwrap();
        wal.rotate().unwrap();
        wal.append(b"second").unwrap();
        wal.sync().unwrap();
        let old = wal.closed[0].path.clone();
        drop(wal);
        let mut bytes = fs::read(&old).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&old, bytes).unwrap();
        let err = Wal::open(dir.path(), 1 << 20, 0).err().unwrap();
        let msg = err.to_string();
        assert!(msg.contains("corrupt") && msg.contains(".wal"), "{msg}");
    }

    #[test]
    fn truncation_deletes_only_flushed_segments_and_keeps_numbering() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(dir.path());
        wal.append(b"a").unwrap();
        wal.append(b"b").unwrap();
        assert_eq!(wal.rotate().unwrap(), 2);
        wal.append(b"c").unwrap();
        wal.sync().unwrap();
        wal.truncate_through(2).unwrap();
        assert_eq!(wal.segments(), 1);
        drop(wal);
        let (mut wal, recs) = open(dir.path());
        assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![3]);
        assert_eq!(wal.append(b"d").unwrap(), 4);
        // With every segment gone, numbering continues from the caller's floor.
        drop(wal);
        for e in fs::read_dir(dir.path()).unwrap() {
            fs::remove_file(e.unwrap().path()).unwrap();
        }
        let (mut wal, _) = Wal::open(dir.path(), 1 << 20, 10).unwrap();
        assert_eq!(wal.append(b"e").unwrap(), 10);
    }

    #[test]
    fn segments_rotate_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 64, 0).unwrap();
        for _ in 0..10 {
            wal.append(&[7u8; 40]).unwrap();
            wal.sync().unwrap();
        }
        assert!(wal.segments() >= 5);
        drop(wal);
        let (_, recs) = Wal::open(dir.path(), 64, 0).unwrap();
        assert_eq!(recs.len(), 10);
    }
}
