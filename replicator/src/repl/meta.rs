//! Where metadata lives and how it is read and written: the superblock (two alternating copies),
//! the activity log (two alternating slots) and the bitmap pages.
//!
//! Internal metadata sits at the end of the backing device, so the replicated (exported) size
//! is smaller than the device:
//!
//! ```text
//! | data ............................ | bitmap pages | AL slot 0 | AL slot 1 | SB A | SB B |
//! ```
//!
//! External metadata is a file with the same pieces from offset 0 (SB A, SB B, AL 0, AL 1,
//! bitmap) and the whole device is data. The superblocks sit at a fixed place (the last 8 KiB,
//! or the first 8 KiB of the file) so they can be found before anything else is known.
//!
//! Every write is followed by fdatasync before the caller proceeds: a write is acknowledged only
//! after the metadata it depends on is durable.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::actlog::ActivityLog;
use super::bitmap::{Bitmap, PAGE};
use crate::generation::Generations;
use crate::superblock::{BLOCK, Superblock, SuperblockError};

/// Where the metadata is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// At the end of the backing device.
    Internal,
    /// In a separate file.
    External(PathBuf),
}

/// Geometry settings (from the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub granularity: u32,
    pub al_extent_size: u32,
    pub al_extents: u32,
}

/// Offsets of each piece, in the metadata file (the device itself when internal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Replicated bytes (what NBD clients see).
    pub data_size: u64,
    pub sb: [u64; 2],
    pub al: [u64; 2],
    pub al_slot: u64,
    pub bitmap: u64,
    pub bitmap_bytes: u64,
}

/// Why metadata could not be created, opened or written.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("cannot open metadata {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("metadata I/O on {path} failed: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "device {path} ({size} bytes) is too small to hold data and internal metadata ({need} bytes of metadata)"
    )]
    TooSmall { path: PathBuf, size: u64, need: u64 },
    #[error("metadata on {path}: {source}")]
    Superblock { path: PathBuf, source: SuperblockError },
    #[error(
        "metadata on {path} belongs to node id {found}, this node is id {want}: it is another node's disk; refusing"
    )]
    Foreign { path: PathBuf, found: u32, want: u32 },
    #[error(
        "metadata on {path} was created with {what} = {found}, the configuration says {want}; recreate it with `duet create-md --force` (a full resync follows)"
    )]
    Mismatch { path: PathBuf, what: &'static str, found: u64, want: u64 },
    #[error(
        "metadata on {path} describes {found} bytes of data but the device now holds {want}; recreate it with `duet create-md --force`"
    )]
    Resized { path: PathBuf, found: u64, want: u64 },
    #[error(
        "activity log on {path}: {source}; recreate the metadata with `duet create-md --force` and resync"
    )]
    ActivityLog { path: PathBuf, source: super::actlog::AlError },
    #[error(
        "metadata already exists on {path} (node id {node}, current generation {current:#x}); pass --force to overwrite it (the next connect does a full resync)"
    )]
    Exists { path: PathBuf, node: u32, current: u64 },
    /// A daemon (or another `create-md`) holds the disk or the metadata file.
    #[error(transparent)]
    Busy(#[from] crate::store::lock::Busy),
}

impl Layout {
    /// Computes the layout for a device of `device_size` bytes.
    pub fn compute(
        device_size: u64,
        placement: &Placement,
        g: Geometry,
    ) -> Result<Self, (u64, u64)> {
        let al_slot = ActivityLog::slot_bytes(g.al_extents as usize);
        let dev = device_size / 4096 * 4096;
        // Size the bitmap for the whole device: it over-covers the metadata area by a few bits.
        let bitmap_bytes = Bitmap::new(dev.max(1), u64::from(g.granularity)).disk_bytes();
        let md = 2 * BLOCK as u64 + 2 * al_slot + bitmap_bytes;
        match placement {
            Placement::Internal => {
                if dev <= md + 4096 {
                    return Err((device_size, md));
                }
                let sb0 = dev - 2 * BLOCK as u64;
                let al0 = sb0 - 2 * al_slot;
                let bitmap = al0 - bitmap_bytes;
                Ok(Self {
                    data_size: bitmap,
                    sb: [sb0, sb0 + BLOCK as u64],
                    al: [al0, al0 + al_slot],
                    al_slot,
                    bitmap,
                    bitmap_bytes,
                })
            }
            Placement::External(_) => {
                let al0 = 2 * BLOCK as u64;
                Ok(Self {
                    data_size: device_size,
                    sb: [0, BLOCK as u64],
                    al: [al0, al0 + al_slot],
                    al_slot,
                    bitmap: al0 + 2 * al_slot,
                    bitmap_bytes,
                })
            }
        }
    }
}

/// What was found on disk at open.
#[derive(Debug)]
pub struct Loaded {
    pub sb: Superblock,
    pub bitmap: Bitmap,
    /// Extents hot at the last AL transaction, and its sequence.
    pub al_hot: Vec<u32>,
    pub al_seq: u64,
}

/// The open metadata.
#[derive(Debug)]
pub struct Meta {
    file: File,
    path: PathBuf,
    pub layout: Layout,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> MetaError + '_ {
    move |source| MetaError::Io { path: path.to_owned(), source }
}

impl Meta {
    fn open_file(
        disk: &Path,
        placement: &Placement,
        create: bool,
    ) -> Result<(File, PathBuf), MetaError> {
        let path = match placement {
            Placement::Internal => disk.to_owned(),
            Placement::External(p) => p.clone(),
        };
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create && matches!(placement, Placement::External(_)))
            .truncate(false)
            .open(&path)
            .map_err(|source| MetaError::Open { path: path.clone(), source })?;
        Ok((f, path))
    }

    fn device_size(disk: &Path) -> Result<u64, MetaError> {
        let f =
            File::open(disk).map_err(|source| MetaError::Open { path: disk.to_owned(), source })?;
        // SEEK_END works for files and block devices alike.
        use std::io::Seek;
        let mut f = f;
        f.seek(std::io::SeekFrom::End(0)).map_err(io(disk))
    }

    /// `duet create-md`: writes fresh metadata (Inconsistent, just-created generation, empty
    /// bitmap and activity log). Refuses to overwrite valid metadata unless `force`.
    pub fn create(
        disk: &Path,
        placement: &Placement,
        g: Geometry,
        node_id: u32,
        force: bool,
    ) -> Result<Layout, MetaError> {
        let size = Self::device_size(disk)?;
        let layout = Layout::compute(size, placement, g)
            .map_err(|(size, need)| MetaError::TooSmall { path: disk.to_owned(), size, need })?;
        let (file, path) = Self::open_file(disk, placement, true)?;
        // Not while anyone serves this disk: a daemon holds the disk (and its external
        // metadata) locked; the disk's lock is probed through a file of its own.
        crate::store::lock::exclusive(&file, &path)?;
        let _disk = match placement {
            Placement::Internal => None,
            Placement::External(_) => {
                let d = File::open(disk)
                    .map_err(|source| MetaError::Open { path: disk.to_owned(), source })?;
                crate::store::lock::exclusive(&d, disk)?;
                Some(d)
            }
        };
        let me = Self { file, path, layout };
        if !force && let Ok(sb) = me.read_sb() {
            {
                return Err(MetaError::Exists {
                    path: me.path,
                    node: sb.node_id,
                    current: sb.uuids.current,
                });
            }
        }
        let zero = vec![0u8; usize::try_from(layout.al_slot).expect("small")];
        me.file.write_all_at(&zero, layout.al[0]).map_err(io(&me.path))?;
        me.file.write_all_at(&zero, layout.al[1]).map_err(io(&me.path))?;
        let chunk = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < layout.bitmap_bytes {
            let n = (layout.bitmap_bytes - at).min(chunk.len() as u64);
            me.file
                .write_all_at(&chunk[..usize::try_from(n).expect("≤ 1 MiB")], layout.bitmap + at)
                .map_err(io(&me.path))?;
            at += n;
        }
        let sb = Superblock {
            sequence: 1,
            volume_size: layout.data_size,
            node_id,
            flags: 0,
            bitmap_granularity: g.granularity,
            al_extent_size: g.al_extent_size,
            al_extents: g.al_extents,
            uuids: Generations::just_created(),
        };
        // Both copies, so a stale copy of older metadata can never win.
        me.file.write_all_at(&sb.encode(), layout.sb[0]).map_err(io(&me.path))?;
        let sb2 = Superblock { sequence: 2, ..sb };
        me.file.write_all_at(&sb2.encode(), layout.sb[1]).map_err(io(&me.path))?;
        me.file.sync_data().map_err(io(&me.path))?;
        Ok(layout)
    }

    fn read_sb(&self) -> Result<Superblock, SuperblockError> {
        let mut a = vec![0u8; BLOCK];
        let mut b = vec![0u8; BLOCK];
        let ra = self.file.read_exact_at(&mut a, self.layout.sb[0]);
        let rb = self.file.read_exact_at(&mut b, self.layout.sb[1]);
        if ra.is_err() && rb.is_err() {
            return Err(SuperblockError::Length(0));
        }
        Superblock::pick(&a, &b).map(|(sb, _)| sb)
    }

    /// Opens and checks metadata against the configuration; loads the bitmap and activity log.
    pub fn open(
        disk: &Path,
        placement: &Placement,
        g: Geometry,
        node_id: u32,
    ) -> Result<(Self, Loaded), MetaError> {
        let (me, sb) = Self::attach(disk, placement, g)?;
        // External metadata is held as the disk is (internal metadata is on the disk, whose
        // store holds it).
        if matches!(placement, Placement::External(_)) {
            crate::store::lock::exclusive(&me.file, &me.path)?;
        }
        let layout = me.layout;
        if sb.node_id != node_id {
            return Err(MetaError::Foreign { path: me.path, found: sb.node_id, want: node_id });
        }
        let checks = [
            (
                "bitmap_granularity_kib",
                u64::from(sb.bitmap_granularity / 1024),
                u64::from(g.granularity / 1024),
            ),
            (
                "activity_log_extent_kib",
                u64::from(sb.al_extent_size / 1024),
                u64::from(g.al_extent_size / 1024),
            ),
            ("activity_log_extents", u64::from(sb.al_extents), u64::from(g.al_extents)),
        ];
        for (what, found, want) in checks {
            if found != want {
                return Err(MetaError::Mismatch { path: me.path, what, found, want });
            }
        }
        if sb.volume_size != layout.data_size {
            return Err(MetaError::Resized {
                path: me.path,
                found: sb.volume_size,
                want: layout.data_size,
            });
        }
        let mut disk_bm =
            vec![0u8; usize::try_from(layout.bitmap_bytes).expect("bitmap fits in memory")];
        me.file.read_exact_at(&mut disk_bm, layout.bitmap).map_err(io(&me.path))?;
        let mut bitmap = Bitmap::new(layout.data_size, u64::from(g.granularity));
        bitmap.load(&disk_bm);
        drop(disk_bm);
        let slot = usize::try_from(layout.al_slot).expect("small");
        let (mut a, mut b) = (vec![0u8; slot], vec![0u8; slot]);
        me.file.read_exact_at(&mut a, layout.al[0]).map_err(io(&me.path))?;
        me.file.read_exact_at(&mut b, layout.al[1]).map_err(io(&me.path))?;
        let (al_seq, al_hot) = ActivityLog::pick(&a, &b)
            .map_err(|source| MetaError::ActivityLog { path: me.path.clone(), source })?;
        Ok((me, Loaded { sb, bitmap, al_hot, al_seq }))
    }

    /// Reads the superblock only (for `dump-md`, with the geometry from the configuration).
    pub fn peek(
        disk: &Path,
        placement: &Placement,
        g: Geometry,
    ) -> Result<(Layout, Superblock), MetaError> {
        Self::attach(disk, placement, g).map(|(me, sb)| (me.layout, sb))
    }

    /// Opens existing metadata and reads its superblock (no checks against the configuration).
    fn attach(
        disk: &Path,
        placement: &Placement,
        g: Geometry,
    ) -> Result<(Self, Superblock), MetaError> {
        let size = Self::device_size(disk)?;
        let layout = Layout::compute(size, placement, g)
            .map_err(|(size, need)| MetaError::TooSmall { path: disk.to_owned(), size, need })?;
        let (file, path) = Self::open_file(disk, placement, false)?;
        let me = Self { file, path, layout };
        let sb = me
            .read_sb()
            .map_err(|source| MetaError::Superblock { path: me.path.clone(), source })?;
        Ok((me, sb))
    }

    /// The same layout in another file: a whole-file copy of a disk with internal metadata
    /// (the kept consistent state of `sync = "scheduled"`), whose metadata is rewritten there.
    pub(crate) fn in_copy(&self, path: &Path) -> Result<Self, MetaError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| MetaError::Open { path: path.to_owned(), source })?;
        Ok(Self { file, path: path.to_owned(), layout: self.layout })
    }

    /// Path of the metadata (the device for internal metadata).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the superblock to the slot its sequence selects, durably.
    pub fn write_sb(&self, sb: &Superblock) -> Result<(), MetaError> {
        let slot = usize::from(sb.sequence.is_multiple_of(2));
        self.file.write_all_at(&sb.encode(), self.layout.sb[slot]).map_err(io(&self.path))?;
        self.file.sync_data().map_err(io(&self.path))
    }

    /// Writes an activity-log record (from [`ActivityLog::record`]) for transaction `seq`.
    pub fn write_al(&self, seq: u64, record: &[u8]) -> Result<(), MetaError> {
        let slot = usize::try_from(seq % 2).expect("0 or 1");
        self.file.write_all_at(record, self.layout.al[slot]).map_err(io(&self.path))?;
        self.file.sync_data().map_err(io(&self.path))
    }

    /// Writes bitmap pages, durably.
    pub fn write_bitmap(&self, pages: &[(usize, Vec<u8>)]) -> Result<(), MetaError> {
        for (i, p) in pages {
            debug_assert_eq!(p.len(), PAGE);
            let at = self.layout.bitmap + (*i as u64) * PAGE as u64;
            self.file.write_all_at(p, at).map_err(io(&self.path))?;
        }
        if !pages.is_empty() {
            self.file.sync_data().map_err(io(&self.path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry { granularity: 4096, al_extent_size: 4 << 20, al_extents: 1237 };

    fn disk(size: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(size).unwrap();
        f
    }

    #[test]
    fn internal_layout_reserves_the_tail() {
        let l = Layout::compute(1 << 30, &Placement::Internal, G).unwrap();
        assert_eq!(l.bitmap_bytes, 32 << 10);
        assert_eq!(l.sb, [(1 << 30) - 8192, (1 << 30) - 4096]);
        assert_eq!(l.data_size, l.bitmap);
        assert_eq!(l.al[1] + l.al_slot, l.sb[0]);
        assert_eq!(l.data_size % 4096, 0);
        assert!(l.data_size > (1 << 30) - (64 << 10));
        assert!(Layout::compute(16 << 10, &Placement::Internal, G).is_err());
        let e = Layout::compute(1 << 30, &Placement::External("/x".into()), G).unwrap();
        assert_eq!(e.data_size, 1 << 30);
    }

    #[test]
    fn create_open_and_refusals() {
        let d = disk(64 << 20);
        let p = d.path();
        let l = Meta::create(p, &Placement::Internal, G, 0, false).unwrap();
        let (m, loaded) = Meta::open(p, &Placement::Internal, G, 0).unwrap();
        assert_eq!(loaded.sb.volume_size, l.data_size);
        assert_eq!(loaded.sb.uuids, Generations::just_created());
        assert_eq!(loaded.bitmap.weight(), 0);
        assert!(loaded.al_hot.is_empty());
        // Bitmap and AL persist.
        let mut bm = loaded.bitmap;
        bm.set_range(8192, 4096);
        let pages: Vec<_> = bm.take_dirty().into_iter().map(|i| (i, bm.page(i))).collect();
        m.write_bitmap(&pages).unwrap();
        let mut al = ActivityLog::new(4 << 20, 1237);
        let rec = al.record(&[3], &[]);
        m.write_al(al.seq() + 1, &rec).unwrap();
        al.commit(12 << 20, 1, &[3], &[]);
        let sb2 = Superblock { sequence: 3, flags: 1, ..loaded.sb };
        m.write_sb(&sb2).unwrap();
        let (_, again) = Meta::open(p, &Placement::Internal, G, 0).unwrap();
        assert_eq!(again.bitmap.weight(), 1);
        assert!(again.bitmap.get(2));
        assert_eq!(again.al_hot, vec![3]);
        assert_eq!(again.sb.flags, 1);

        // Another node's id, a changed geometry, existing metadata without --force.
        assert!(matches!(
            Meta::open(p, &Placement::Internal, G, 1),
            Err(MetaError::Foreign { .. })
        ));
        let g2 = Geometry { al_extents: 100, ..G };
        assert!(Meta::open(p, &Placement::Internal, g2, 0).is_err());
        assert!(matches!(
            Meta::create(p, &Placement::Internal, G, 0, false),
            Err(MetaError::Exists { .. })
        ));
        Meta::create(p, &Placement::Internal, G, 0, true).unwrap();

        // Foreign bytes: refused with the create-md hint; nothing guessed.
        let other = disk(64 << 20);
        std::fs::write(other.path(), vec![0xAB; 64 << 20]).unwrap();
        let e = Meta::open(other.path(), &Placement::Internal, G, 0).unwrap_err().to_string();
        assert!(e.contains("unusable") || e.contains("duet create-md"), "{e}");
    }

    #[test]
    fn torn_superblock_falls_back_to_the_other_copy() {
        let d = disk(64 << 20);
        let p = d.path();
        Meta::create(p, &Placement::Internal, G, 0, false).unwrap();
        let (m, loaded) = Meta::open(p, &Placement::Internal, G, 0).unwrap();
        let newer = Superblock { sequence: 3, flags: 1, ..loaded.sb };
        m.write_sb(&newer).unwrap(); // slot A (odd)
        // Tear slot A: half of it overwritten.
        m.file.write_all_at(&[0x55; 2048], m.layout.sb[0] + 1024).unwrap();
        let (_, back) = Meta::open(p, &Placement::Internal, G, 0).unwrap();
        assert_eq!(back.sb.sequence, 2, "the older good copy");
    }

    #[test]
    fn external_metadata_leaves_the_device_whole() {
        let d = disk(32 << 20);
        let dir = tempfile::tempdir().unwrap();
        let mp = dir.path().join("vol.md");
        let place = Placement::External(mp.clone());
        let l = Meta::create(d.path(), &place, G, 1, false).unwrap();
        assert_eq!(l.data_size, 32 << 20);
        let (_, loaded) = Meta::open(d.path(), &place, G, 1).unwrap();
        assert_eq!(loaded.sb.node_id, 1);
        assert!(std::fs::metadata(&mp).unwrap().len() >= l.bitmap + l.bitmap_bytes);
    }
}
