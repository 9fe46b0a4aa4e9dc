//! What a power cut keeps of a file: the written-but-unsynced state of one file, as the
//! power-cut file system (`blixard-lazyfs`) holds it in memory until `fsync`.
//!
//! A file is its synced content (the backing file) plus an overlay of 4 KiB pages written
//! since the last sync, a current length, and how much of the backing file is still valid (a
//! truncation shortens it, and a later extension reads zeros there, not the old bytes). Reads
//! see the overlay; [`Overlay::sync`] writes the overlay to the backing file and fsyncs it;
//! dropping the overlay is the power cut. Pure over the [`Backing`] trait, table-tested with
//! an in-memory backing.

use std::collections::BTreeMap;
use std::io;

/// Overlay page size.
pub const PAGE: u64 = 4096;

/// The synced content of a file.
pub trait Backing {
    fn size(&self) -> io::Result<u64>;
    /// Reads at most `buf.len()` bytes at `off`; fewer at the end of the file.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    fn write_at(&mut self, data: &[u8], off: u64) -> io::Result<()>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    fn sync(&mut self) -> io::Result<()>;
}

/// A file's unsynced writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pages: BTreeMap<u64, Vec<u8>>,
    /// The file's current length.
    len: u64,
    /// Bytes of the backing file still part of the file (below every truncation since sync).
    valid: u64,
}

impl Overlay {
    /// A clean overlay over a backing file of `len` bytes.
    pub fn clean(len: u64) -> Self {
        Overlay {
            pages: BTreeMap::new(),
            len,
            valid: len,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether nothing was written since the last sync.
    pub fn is_clean(&self, backing_len: u64) -> bool {
        self.pages.is_empty() && self.len == backing_len && self.valid == backing_len
    }

    /// The content of page `p` as it is now.
    fn page(&self, b: &dyn Backing, p: u64) -> io::Result<Vec<u8>> {
        if let Some(pg) = self.pages.get(&p) {
            return Ok(pg.clone());
        }
        let mut pg = vec![0u8; PAGE as usize];
        let start = p * PAGE;
        if start < self.valid {
            let want = (self.valid - start).min(PAGE) as usize;
            let mut got = 0;
            while got < want {
                let n = b.read_at(&mut pg[got..want], start + got as u64)?;
                if n == 0 {
                    break;
                }
                got += n;
            }
        }
        Ok(pg)
    }

    /// Reads up to `size` bytes at `off` (fewer at the end of the file).
    pub fn read(&self, b: &dyn Backing, off: u64, size: u64) -> io::Result<Vec<u8>> {
        let end = off.saturating_add(size).min(self.len);
        let mut out = Vec::with_capacity(end.saturating_sub(off) as usize);
        let mut pos = off;
        while pos < end {
            let p = pos / PAGE;
            let pg = self.page(b, p)?;
            let from = (pos - p * PAGE) as usize;
            let to = ((end - p * PAGE).min(PAGE)) as usize;
            out.extend_from_slice(&pg[from..to]);
            pos = p * PAGE + to as u64;
        }
        Ok(out)
    }

    /// Writes `data` at `off`, in memory only.
    pub fn write(&mut self, b: &dyn Backing, off: u64, data: &[u8]) -> io::Result<()> {
        let end = off + data.len() as u64;
        let mut pos = off;
        while pos < end {
            let p = pos / PAGE;
            let mut pg = self.page(b, p)?;
            let from = (pos - p * PAGE) as usize;
            let to = ((end - p * PAGE).min(PAGE)) as usize;
            let src = (pos - off) as usize;
            pg[from..to].copy_from_slice(&data[src..src + (to - from)]);
            self.pages.insert(p, pg);
            pos = p * PAGE + to as u64;
        }
        self.len = self.len.max(end);
        Ok(())
    }

    /// Sets the length, in memory only.
    pub fn truncate(&mut self, len: u64) {
        if len < self.len {
            self.pages.retain(|p, _| p * PAGE < len);
            let last = len / PAGE;
            if let Some(pg) = self.pages.get_mut(&last) {
                let from = (len - last * PAGE) as usize;
                pg[from..].fill(0);
            }
            self.valid = self.valid.min(len);
        }
        self.len = len;
    }

    /// Writes everything to the backing file and fsyncs it: from now on it survives a cut.
    pub fn sync(&mut self, b: &mut dyn Backing) -> io::Result<()> {
        if self.valid < b.size()? {
            b.set_len(self.valid)?;
        }
        for (p, pg) in &self.pages {
            let start = p * PAGE;
            if start >= self.len {
                continue;
            }
            let n = (self.len - start).min(PAGE) as usize;
            b.write_at(&pg[..n], start)?;
        }
        b.set_len(self.len)?;
        b.sync()?;
        self.pages.clear();
        self.valid = self.len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory backing file that counts syncs.
    #[derive(Default)]
    struct Mem {
        data: Vec<u8>,
        syncs: u32,
    }

    impl Backing for Mem {
        fn size(&self) -> io::Result<u64> {
            Ok(self.data.len() as u64)
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            let off = off as usize;
            if off >= self.data.len() {
                return Ok(0);
            }
            let n = buf.len().min(self.data.len() - off);
            buf[..n].copy_from_slice(&self.data[off..off + n]);
            Ok(n)
        }
        fn write_at(&mut self, data: &[u8], off: u64) -> io::Result<()> {
            let end = off as usize + data.len();
            if self.data.len() < end {
                self.data.resize(end, 0);
            }
            self.data[off as usize..end].copy_from_slice(data);
            Ok(())
        }
        fn set_len(&mut self, len: u64) -> io::Result<()> {
            self.data.resize(len as usize, 0);
            Ok(())
        }
        fn sync(&mut self) -> io::Result<()> {
            self.syncs += 1;
            Ok(())
        }
    }

    enum Op {
        Write(u64, &'static [u8]),
        Truncate(u64),
        Sync,
        /// Power cut: the overlay is dropped and rebuilt from the backing file.
        Cut,
    }

    /// Runs `ops` on a file whose synced content is `initial`, and checks what a reader sees
    /// (`now`) and what the backing file holds (`synced`).
    fn run(initial: &[u8], ops: &[Op]) -> (Vec<u8>, Vec<u8>) {
        let mut b = Mem {
            data: initial.to_vec(),
            syncs: 0,
        };
        let mut o = Overlay::clean(initial.len() as u64);
        for op in ops {
            match op {
                Op::Write(off, d) => o.write(&b, *off, d).unwrap_or_default(),
                Op::Truncate(l) => o.truncate(*l),
                Op::Sync => o.sync(&mut b).unwrap_or_default(),
                Op::Cut => o = Overlay::clean(b.data.len() as u64),
            }
        }
        let now = o.read(&b, 0, 1 << 20).unwrap_or_default();
        (now, b.data)
    }

    /// Name, synced content before, operations, what a reader sees, what survives a cut.
    type Case = (
        &'static str,
        &'static [u8],
        Vec<Op>,
        &'static [u8],
        &'static [u8],
    );

    #[test]
    fn overlay_table() {
        use Op::*;
        let cases: Vec<Case> = vec![
            ("nothing written", b"abc", vec![], b"abc", b"abc"),
            (
                "unsynced write is seen, not kept",
                b"abc",
                vec![Write(1, b"X")],
                b"aXc",
                b"abc",
            ),
            (
                "synced write is kept",
                b"abc",
                vec![Write(1, b"X"), Sync],
                b"aXc",
                b"aXc",
            ),
            (
                "cut drops the unsynced write",
                b"abc",
                vec![Write(1, b"X"), Cut],
                b"abc",
                b"abc",
            ),
            (
                "only what was synced survives",
                b"abc",
                vec![Write(0, b"1"), Sync, Write(1, b"2"), Cut],
                b"1bc",
                b"1bc",
            ),
            (
                "append past the end",
                b"ab",
                vec![Write(2, b"cd")],
                b"abcd",
                b"ab",
            ),
            (
                "a hole reads zeros",
                b"",
                vec![Write(3, b"z"), Sync],
                b"\0\0\0z",
                b"\0\0\0z",
            ),
            (
                "truncate is unsynced too",
                b"abcdef",
                vec![Truncate(2)],
                b"ab",
                b"abcdef",
            ),
            (
                "truncate, synced",
                b"abcdef",
                vec![Truncate(2), Sync],
                b"ab",
                b"ab",
            ),
            (
                "truncate then extend reads zeros, not the old bytes",
                b"abcdef",
                vec![Truncate(2), Write(4, b"Z")],
                b"ab\0\0Z",
                b"abcdef",
            ),
            (
                "truncate then extend, synced",
                b"abcdef",
                vec![Truncate(2), Write(4, b"Z"), Sync],
                b"ab\0\0Z",
                b"ab\0\0Z",
            ),
            (
                "truncate inside a written page zeros its tail",
                b"",
                vec![Write(0, b"abcdef"), Truncate(2), Truncate(6)],
                b"ab\0\0\0\0",
                b"",
            ),
            (
                "cut after truncate restores",
                b"abcdef",
                vec![Truncate(1), Cut],
                b"abcdef",
                b"abcdef",
            ),
        ];
        for (name, initial, ops, now, synced) in cases {
            let (got_now, got_synced) = run(initial, &ops);
            assert_eq!(got_now, now, "{name}: what a reader sees");
            assert_eq!(got_synced, synced, "{name}: what survives a cut");
        }
    }

    #[test]
    fn writes_across_pages() {
        let mut b = Mem::default();
        let mut o = Overlay::clean(0);
        let data: Vec<u8> = (0..3 * PAGE + 17).map(|i| (i % 251) as u8).collect();
        o.write(&b, 5, &data).unwrap_or_default();
        let got = o.read(&b, 5, data.len() as u64).unwrap_or_default();
        assert_eq!(got, data);
        assert!(
            b.data.is_empty(),
            "nothing reached the backing file before sync"
        );
        o.sync(&mut b).unwrap_or_default();
        assert_eq!(b.syncs, 1);
        assert_eq!(&b.data[5..], &data[..]);
        assert!(o.is_clean(b.data.len() as u64));
        // A partial overwrite in the middle of the second page, then a cut.
        o.write(&b, PAGE + 100, b"XYZ").unwrap_or_default();
        let o = Overlay::clean(b.data.len() as u64);
        assert_eq!(o.read(&b, 5, data.len() as u64).unwrap_or_default(), data);
    }
}
