//! What a manager knows of its directory: the checkpoint files of the last scan and
//! what verifying each of them showed, tied to the file's identity.
//!
//! Listing the directory again reads only the files that changed (see
//! [`scan::rescan`]); a verification result stays attached to a file for as long as
//! its identity does not change, so nothing unchanged is hashed twice.

use std::borrow::Cow;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::scan::{self, Entry, Found, Identity, Kind};

/// What a listing says of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// An h5ckpt file whose every byte was verified.
    Valid,
    /// Corrupt, truncated, tampered, foreign, or refused.
    Invalid,
    /// A file of the predecessor's format.
    Legacy,
    /// An h5ckpt file whose header is intact, payload not hashed yet.
    Unverified,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Valid => "valid",
            Status::Invalid => "invalid",
            Status::Legacy => "legacy",
            Status::Unverified => "unverified",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "valid" => Status::Valid,
            "invalid" => Status::Invalid,
            "legacy" => Status::Legacy,
            "unverified" => Status::Unverified,
            _ => {
                return Err(Error::invalid(format!(
                    "status must be 'valid', 'invalid', 'legacy' or 'unverified', got {s:?}"
                )))
            }
        })
    }
}

/// The outcome of checking a whole file.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub status: Status,
    pub error: Option<String>,
}

/// One file as the catalog knows it.
#[derive(Clone, Debug)]
pub struct Record {
    pub entry: Entry,
    /// What checking the whole file showed, for this identity.
    pub verdict: Option<Verdict>,
    /// `(loss, timestamp)` of a legacy file, read by the caller (the HDF5 side).
    pub summary: Option<(f64, f64)>,
    /// Changes whenever anything above does: a caller may keep what it built from
    /// a record for as long as the version is the same.
    pub version: u64,
    /// Deleted by this process: kept in place (removing it from the middle of
    /// 10,000 would move the rest, once per deleted file) until the next refresh.
    forgotten: bool,
}

/// A status with whether the whole file was checked for it, and why it is invalid.
pub type Assessment<'a> = (Status, bool, Option<Cow<'a, str>>);

impl Record {
    /// The status of the file for a reader with (`keyed`) or without an HMAC key.
    ///
    /// What the header alone shows comes first (foreign, malformed, a name that
    /// disagrees with the header, a legacy file for a keyed reader); then the
    /// verdict, if the file was checked; else "unverified" (or "legacy"). A file that
    /// could not be read is "unverified" with the reason: a failed read says nothing
    /// of what the file holds.
    pub fn assess(&self, keyed: bool) -> Assessment<'_> {
        let e = &self.entry;
        if let Some(error) = &e.error {
            if e.unread {
                return (Status::Unverified, false, Some(Cow::Borrowed(error)));
            }
            return (Status::Invalid, true, Some(Cow::Borrowed(error)));
        }
        match e.kind {
            Kind::Foreign => {
                return (
                    Status::Invalid,
                    true,
                    Some(Cow::Borrowed("not a checkpoint file")),
                )
            }
            Kind::Legacy if keyed => {
                return (
                    Status::Invalid,
                    true,
                    Some(Cow::Borrowed(
                        "legacy file without an HMAC tag, refused by a keyed manager",
                    )),
                )
            }
            _ => {}
        }
        if let Some(h) = &e.header {
            if h.batch_idx != e.batch_idx {
                // A renamed file would otherwise resume, and be retained, as another
                // batch.
                return (
                    Status::Invalid,
                    true,
                    Some(Cow::Owned(format!(
                        "file name says batch {}, header says {}",
                        e.batch_idx, h.batch_idx
                    ))),
                );
            }
        }
        if let Some(v) = &self.verdict {
            return (v.status, true, v.error.as_deref().map(Cow::Borrowed));
        }
        match e.kind {
            Kind::Legacy => (Status::Legacy, false, None),
            _ => (Status::Unverified, false, None),
        }
    }

    /// `(loss, timestamp)`: from the header, from a legacy file's summary, else NaN.
    pub fn loss_and_timestamp(&self) -> (f64, f64) {
        match (&self.entry.header, self.summary) {
            (Some(h), _) => (h.loss, h.timestamp),
            (None, Some(summary)) => summary,
            (None, None) => (f64::NAN, f64::NAN),
        }
    }

    /// Whether this is a legacy file whose loss and timestamp the caller has yet to
    /// read.
    pub fn needs_summary(&self, keyed: bool) -> bool {
        self.entry.kind == Kind::Legacy
            && self.summary.is_none()
            && self.assess(keyed).0 != Status::Invalid
    }
}

/// The checkpoint files of one directory and prefix.
#[derive(Debug)]
pub struct Catalog {
    directory: PathBuf,
    prefix: String,
    keyed: bool,
    /// By `(batch_idx, name)`, as a scan returns them, forgotten ones included.
    records: Vec<Record>,
    forgotten: usize,
    next_version: u64,
}

impl Catalog {
    /// An empty catalog; `keyed` says whether its reader checks HMAC tags.
    pub fn new(directory: PathBuf, prefix: String, keyed: bool) -> Self {
        Catalog {
            directory,
            prefix,
            keyed,
            records: Vec::new(),
            forgotten: 0,
            next_version: 0,
        }
    }

    pub fn keyed(&self) -> bool {
        self.keyed
    }

    pub fn len(&self) -> usize {
        self.records.len() - self.forgotten
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The records of the last refresh (and later changes), by `(batch_idx, name)`.
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.records.iter().filter(|r| !r.forgotten)
    }

    /// Where `name` is or would go in `records`, forgotten records included.
    fn position(&self, name: &str) -> Option<usize> {
        let batch_idx = scan::parse_name(name, &self.prefix)?;
        self.records
            .binary_search_by(|r| {
                (r.entry.batch_idx, r.entry.name.as_str()).cmp(&(batch_idx, name))
            })
            .ok()
    }

    pub fn get(&self, name: &str) -> Option<&Record> {
        let r = &self.records[self.position(name)?];
        (!r.forgotten).then_some(r)
    }

    fn version(&mut self) -> u64 {
        self.next_version += 1;
        self.next_version
    }

    /// Scans the directory again (see [`scan::rescan`]): files that are gone are
    /// forgotten; a file whose identity changed is read again and loses its verdict
    /// and summary. Then [`Catalog::records`] lists the directory.
    pub fn refresh(&mut self) -> Result<()> {
        let records = &self.records;
        let found = scan::rescan(&self.directory, &self.prefix, |batch_idx, name| {
            let i = records
                .binary_search_by(|r| {
                    (r.entry.batch_idx, r.entry.name.as_str()).cmp(&(batch_idx, name))
                })
                .ok()?;
            // An entry that could not be read is read again, whatever its identity.
            let r = &records[i];
            (r.entry.error.is_none() && !r.forgotten).then_some((i, r.entry.identity))
        })?;
        let mut old: Vec<Option<Record>> = std::mem::take(&mut self.records)
            .into_iter()
            .map(Some)
            .collect();
        let mut records = Vec::with_capacity(found.len());
        for f in found {
            let record = match f {
                Found::Unchanged(i) => old[i].take(),
                Found::Read(entry) => Some(Record {
                    entry: *entry,
                    verdict: None,
                    summary: None,
                    version: self.version(),
                    forgotten: false,
                }),
            };
            records.extend(record);
        }
        self.records = records;
        self.forgotten = 0;
        Ok(())
    }

    /// Attaches `verdict` and/or `summary` to the file `name` if it still has
    /// `identity`; returns its record then. A result about an older version of the
    /// file is dropped.
    pub fn note(
        &mut self,
        name: &str,
        identity: &Identity,
        verdict: Option<Verdict>,
        summary: Option<(f64, f64)>,
    ) -> Option<&Record> {
        let i = self.position(name)?;
        if self.records[i].forgotten || self.records[i].entry.identity != *identity {
            return None;
        }
        let version = self.version();
        let record = &mut self.records[i];
        if verdict.is_some() {
            record.verdict = verdict;
        }
        if summary.is_some() {
            record.summary = summary;
        }
        record.version = version;
        Some(record)
    }

    /// Records `verdict` for the file `name` as it is now (read again here): for a
    /// file this process has just written, or found not to load.
    pub fn remember(&mut self, name: &str, verdict: Verdict) -> Result<()> {
        let entry = scan::examine_name(&self.directory, &self.prefix, name)?;
        let at = self.position(name);
        match (entry, at) {
            (Some(entry), at) => {
                let record = Record {
                    entry,
                    verdict: Some(verdict),
                    summary: None,
                    version: self.version(),
                    forgotten: false,
                };
                match at {
                    Some(i) => {
                        self.forgotten -= usize::from(self.records[i].forgotten);
                        self.records[i] = record;
                    }
                    None => {
                        let key = (record.entry.batch_idx, record.entry.name.as_str());
                        let i = self
                            .records
                            .partition_point(|r| (r.entry.batch_idx, r.entry.name.as_str()) < key);
                        self.records.insert(i, record);
                    }
                }
            }
            (None, Some(_)) => self.forget(name),
            (None, None) => {}
        }
        Ok(())
    }

    /// Drops what is known of `name` (a file this process deleted).
    pub fn forget(&mut self, name: &str) {
        if let Some(i) = self.position(name) {
            let r = &mut self.records[i];
            if !r.forgotten {
                r.forgotten = true;
                r.verdict = None;
                self.forgotten += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::tree_digest;
    use crate::header::{encode, HeaderFields, HDF5_SIGNATURE};
    use std::path::Path;

    /// An intact h5ckpt file `ck_batch_<batch>.h5` (or named `name`).
    fn make(dir: &Path, batch: u64, payload: &[u8], name: Option<&str>) {
        let fields = HeaderFields {
            payload_length: payload.len() as u64,
            chunk_log2: 12,
            batch_idx: batch,
            loss: 1.5,
            timestamp: 10.0,
            payload_digest: tree_digest(payload, 12),
        };
        let mut bytes = encode(&fields, None).unwrap().to_vec();
        bytes.extend_from_slice(payload);
        let default = format!("ck_batch_{batch}.h5");
        std::fs::write(dir.join(name.unwrap_or(&default)), bytes).unwrap();
    }

    fn statuses(c: &mut Catalog) -> Vec<(String, &'static str, bool)> {
        let keyed = c.keyed();
        c.refresh().unwrap();
        c.records()
            .map(|r| {
                let (s, verified, _) = r.assess(keyed);
                (r.entry.name.clone(), s.as_str(), verified)
            })
            .collect()
    }

    fn valid() -> Verdict {
        Verdict {
            status: Status::Valid,
            error: None,
        }
    }

    #[test]
    fn verdicts_stay_with_the_identity_they_were_found_for() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        make(dir, 1, b"one", None);
        make(dir, 2, b"two", None);
        let mut c = Catalog::new(dir.to_path_buf(), "ck".into(), false);
        assert_eq!(
            statuses(&mut c),
            vec![
                ("ck_batch_1.h5".into(), "unverified", false),
                ("ck_batch_2.h5".into(), "unverified", false)
            ]
        );
        let ident = c.get("ck_batch_1.h5").unwrap().entry.identity;
        let v0 = c.get("ck_batch_1.h5").unwrap().version;
        assert!(c
            .note("ck_batch_1.h5", &ident, Some(valid()), None)
            .is_some());
        assert!(c.get("ck_batch_1.h5").unwrap().version > v0);
        // A result about another identity is dropped.
        let other = Identity {
            size: ident.size + 1,
            ..ident
        };
        let bad = Verdict {
            status: Status::Invalid,
            error: Some("x".into()),
        };
        assert!(c.note("ck_batch_2.h5", &other, Some(bad), None).is_none());
        assert!(c.note("missing", &ident, Some(valid()), None).is_none());
        let v1 = c.get("ck_batch_1.h5").unwrap().version;
        assert_eq!(statuses(&mut c)[0], ("ck_batch_1.h5".into(), "valid", true));
        assert_eq!(statuses(&mut c)[1].1, "unverified");
        // Unchanged: same version, nothing rebuilt.
        assert_eq!(c.get("ck_batch_1.h5").unwrap().version, v1);

        // Rewritten (new inode and size): the verdict is gone.
        std::fs::remove_file(dir.join("ck_batch_1.h5")).unwrap();
        make(dir, 1, b"one again", None);
        assert_eq!(
            statuses(&mut c)[0],
            ("ck_batch_1.h5".into(), "unverified", false)
        );
        // Deleted: forgotten.
        std::fs::remove_file(dir.join("ck_batch_2.h5")).unwrap();
        assert_eq!(statuses(&mut c).len(), 1);
        assert_eq!(c.len(), 1);
        assert!(c.get("ck_batch_2.h5").is_none());
    }

    #[test]
    fn remember_reads_the_file_as_it_is_now() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let mut c = Catalog::new(dir.to_path_buf(), "ck".into(), false);
        make(dir, 3, b"three", None);
        c.remember("ck_batch_3.h5", valid()).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(
            statuses(&mut c),
            vec![("ck_batch_3.h5".into(), "valid", true)]
        );
        c.remember("ck_batch_4.h5", valid()).unwrap(); // no such file
        c.remember("other_batch_3.h5", valid()).unwrap(); // not ours
        assert_eq!(c.len(), 1);
        c.forget("ck_batch_3.h5");
        assert!(c.is_empty());
        assert_eq!(statuses(&mut c)[0].1, "unverified");
    }

    #[test]
    fn forgotten_files_leave_every_view_at_once() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        for b in 0..5 {
            make(dir, b, b"p", None);
        }
        let mut c = Catalog::new(dir.to_path_buf(), "ck".into(), false);
        c.refresh().unwrap();
        let ident = c.get("ck_batch_2.h5").unwrap().entry.identity;
        c.forget("ck_batch_2.h5");
        c.forget("ck_batch_2.h5"); // twice: no effect
        c.forget("ck_batch_9.h5"); // unknown: no effect
        assert_eq!(c.len(), 4);
        assert!(c.get("ck_batch_2.h5").is_none());
        assert!(c
            .note("ck_batch_2.h5", &ident, Some(valid()), None)
            .is_none());
        let batches: Vec<u64> = c.records().map(|r| r.entry.batch_idx).collect();
        assert_eq!(batches, vec![0, 1, 3, 4]);
        // Remembered again (rewritten by this process): back, with its verdict.
        c.remember("ck_batch_2.h5", valid()).unwrap();
        assert_eq!(c.len(), 5);
        assert_eq!(c.get("ck_batch_2.h5").unwrap().verdict, Some(valid()));
        // Forgotten but still on disk: the next refresh reads it again.
        c.forget("ck_batch_3.h5");
        c.refresh().unwrap();
        assert_eq!(c.len(), 5);
        assert_eq!(
            c.get("ck_batch_3.h5").unwrap().assess(false).0,
            Status::Unverified
        );
        assert_eq!(
            c.get("ck_batch_2.h5").unwrap().assess(false).0,
            Status::Valid
        );
    }

    #[test]
    fn header_findings_come_before_verdicts() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        make(dir, 5, b"x", None);
        make(dir, 5, b"x", Some("ck_batch_6.h5")); // the header says 5, the name 6
        let mut legacy = HDF5_SIGNATURE.to_vec();
        legacy.extend_from_slice(&[0; 64]);
        std::fs::write(dir.join("ck_batch_7.h5"), &legacy).unwrap();
        std::fs::write(dir.join("ck_batch_8.h5"), b"junk").unwrap();
        for keyed in [false, true] {
            let mut c = Catalog::new(dir.to_path_buf(), "ck".into(), keyed);
            c.refresh().unwrap();
            for name in ["ck_batch_5.h5", "ck_batch_6.h5", "ck_batch_7.h5"] {
                let ident = c.get(name).unwrap().entry.identity;
                c.note(name, &ident, Some(valid()), None).unwrap();
            }
            c.refresh().unwrap();
            let got: Vec<_> = c
                .records()
                .map(|r| {
                    let (s, _, e) = r.assess(keyed);
                    (s, e.map(|e| e.into_owned()))
                })
                .collect();
            assert_eq!(got[0], (Status::Valid, None));
            assert_eq!(got[1].0, Status::Invalid);
            assert!(got[1].1.as_deref().unwrap().contains("header says 5"));
            if keyed {
                assert_eq!(got[2].0, Status::Invalid);
                assert!(got[2].1.as_deref().unwrap().contains("keyed manager"));
            } else {
                assert_eq!(got[2], (Status::Valid, None));
            }
            assert_eq!(
                got[3],
                (Status::Invalid, Some("not a checkpoint file".to_string()))
            );
        }
    }

    #[test]
    fn legacy_summaries() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let mut legacy = HDF5_SIGNATURE.to_vec();
        legacy.extend_from_slice(&[0; 64]);
        std::fs::write(dir.join("ck_batch_1.h5"), &legacy).unwrap();
        make(dir, 2, b"x", None);
        let mut c = Catalog::new(dir.to_path_buf(), "ck".into(), false);
        c.refresh().unwrap();
        let recs: Vec<&Record> = c.records().collect();
        assert!(recs[0].needs_summary(false));
        assert!(!recs[0].needs_summary(true)); // refused anyway
        assert!(!recs[1].needs_summary(false));
        assert!(recs[0].loss_and_timestamp().0.is_nan());
        let ident = recs[0].entry.identity;
        c.note("ck_batch_1.h5", &ident, None, Some((0.5, 7.0)));
        c.refresh().unwrap();
        let recs: Vec<&Record> = c.records().collect();
        assert!(!recs[0].needs_summary(false));
        assert_eq!(recs[0].loss_and_timestamp(), (0.5, 7.0));
        assert_eq!(recs[0].assess(false).0, Status::Legacy);
    }

    #[test]
    fn a_file_that_cannot_be_read_is_unverified_not_invalid() {
        let d = tempfile::tempdir().unwrap();
        make(d.path(), 1, b"payload", None);
        let mut c = Catalog::new(d.path().to_path_buf(), "ck".into(), false);
        c.refresh().unwrap();
        let mut record = c.get("ck_batch_1.h5").unwrap().clone();
        record.entry.error = Some("cannot open ck_batch_1.h5: Too many open files".into());
        record.entry.unread = true;
        let (status, verified, error) = record.assess(false);
        assert_eq!((status, verified), (Status::Unverified, false));
        assert!(error.unwrap().contains("Too many open files"));
        // What the bytes showed is a verdict, though.
        record.entry.unread = false;
        assert_eq!(record.assess(false).0, Status::Invalid);
    }

    #[test]
    fn status_names_round_trip() {
        for s in [
            Status::Valid,
            Status::Invalid,
            Status::Legacy,
            Status::Unverified,
        ] {
            assert_eq!(Status::parse(s.as_str()).unwrap(), s);
        }
        assert!(Status::parse("ok").is_err());
    }
}
