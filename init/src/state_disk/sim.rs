//! A simulated state disk (the first bytes of a disk in memory, device-mapper, mkfs and the
//! mount as recorded steps) and the ordering rules of the state phase checked against it:
//! rules that otherwise only a QEMU boot exercises.

use std::cell::RefCell;
use std::rc::Rc;

use super::*;
use crate::disk::luks2::copy_label;

/// Everything the phase did, in order, shared by the disk, its key source and `measure`.
type Steps = Rc<RefCell<Vec<String>>>;

const SECRET: &[u8] = b"the simulated key source's secret";

struct SimDisk {
    size: u64,
    /// The disk's first bytes (the LUKS2 metadata and the integrity superblock); reads past
    /// them are zeros and writes past them are only recorded.
    bytes: Vec<u8>,
    steps: Steps,
    mkfs_fails: bool,
}

impl SimDisk {
    fn new(bytes: Vec<u8>, steps: &Steps) -> SimDisk {
        let mut bytes = bytes;
        bytes.resize((DATA_OFFSET as usize) + SUPERBLOCK_LEN, 0);
        SimDisk {
            size: MIN_FORMAT_SIZE,
            bytes,
            steps: steps.clone(),
            mkfs_fails: false,
        }
    }

    fn step(&self, step: impl Into<String>) {
        self.steps.borrow_mut().push(step.into());
    }
}

impl StateDisk for SimDisk {
    fn open(&mut self, serial: &str) -> Result<(String, (u32, u32), u64), StateError> {
        self.step(format!("open {serial}"));
        Ok(("/dev/vdb".into(), (252, 16), self.size))
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.step(format!("read {offset} {}", buf.len()));
        buf.fill(0);
        let start = (offset as usize).min(self.bytes.len());
        let end = (offset as usize + buf.len()).min(self.bytes.len());
        buf[..end - start].copy_from_slice(&self.bytes[start..end]);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.step(format!("write {offset}"));
        let start = (offset as usize).min(self.bytes.len());
        let end = (offset as usize + buf.len()).min(self.bytes.len());
        self.bytes[start..end].copy_from_slice(&buf[..end - start]);
        // Either copy of the header saying COMMITTED is the commit.
        let committed = [0, HDR_SIZE]
            .iter()
            .any(|&at| copy_label(&self.bytes, at).is_some_and(|(label, _)| label == COMMITTED));
        if committed && !self.steps.borrow().iter().any(|s| s == "committed") {
            self.step("committed");
        }
        Ok(())
    }

    fn sync(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn key_source(
        &mut self,
        _choice: KeySourceChoice,
        _kbs: Option<&KbsConfig>,
        _tee: Tee,
    ) -> Result<Box<dyn KeySource>, StateError> {
        self.step("key source");
        Ok(Box::new(SimKey {
            steps: self.steps.clone(),
        }))
    }

    fn map(
        &mut self,
        _policy: &Policy,
        _device: &str,
        _dev: (u32, u32),
        size: u64,
        _formatted: bool,
        _volume_key: &[u8],
    ) -> Result<(MappedDevice, u64), StateError> {
        self.step("map");
        let mapped = MappedDevice {
            name: DM_NAME.into(),
            major: 253,
            minor: 0,
        };
        Ok((mapped, (size - DATA_OFFSET) / 512))
    }

    fn prepare(&mut self, _cfg: &StateConfig, _node: &str, _bytes: u64) -> Result<(), StateError> {
        self.step("prepare");
        Ok(())
    }

    fn mkfs(&mut self, _cfg: &StateConfig, node: &str) -> Result<(), StateError> {
        self.step("mkfs");
        if self.mkfs_fails {
            return Err(StateError::Mkfs {
                program: "mkfs.ext4".into(),
                device: node.into(),
                detail: "simulated failure".into(),
            });
        }
        Ok(())
    }

    fn report_file_system(&mut self, _node: &str) {
        self.step("report");
    }

    fn mount(&mut self, _cfg: &StateConfig, _node: &str) -> Result<(), StateError> {
        self.step("mount");
        Ok(())
    }
}

/// A key source that records when a secret is derived.
struct SimKey {
    steps: Steps,
}

impl KeySource for SimKey {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn provision(&mut self) -> Result<crate::keys::Provisioned, KeyError> {
        self.steps.borrow_mut().push("provision".into());
        Ok(crate::keys::Provisioned {
            secret: Zeroizing::new(SECRET.to_vec()),
            token: None,
        })
    }

    fn recover(&mut self, _token: Option<&luks2::Token>) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        self.steps.borrow_mut().push("recover".into());
        Ok(Zeroizing::new(SECRET.to_vec()))
    }
}

fn config() -> StateConfig {
    crate::config::parse_config_file(
        Path::new("/c"),
        "[state]\nserial = \"s\"\nkey = \"kbs\"\n[kbs]\nurl = \"https://h:1\"\nca = \"/c.pem\"\nresource = \"r/t/k\"",
    )
    .unwrap()
    .state
    .unwrap()
}

/// Runs the phase on `disk`; `measure` records each event (and fails on `fail_on`).
fn run(disk: &mut SimDisk, fail_on: Option<&str>) -> Result<Opened, StateError> {
    let steps = disk.steps.clone();
    let mut measure = |event: Event| {
        let name = match &event {
            Event::StateDisk(Some(id)) => {
                format!("measure state-disk {}", String::from_utf8_lossy(id))
            }
            Event::VolumeKey(_) => "measure volume-key".to_string(),
            other => format!("measure {}", other.description()),
        };
        steps.borrow_mut().push(name.clone());
        if fail_on.is_some_and(|f| name.starts_with(f)) {
            return Err(MeasureError::Log {
                path: "/run/log".into(),
                source: std::io::Error::other("simulated"),
            });
        }
        Ok(())
    };
    set_up_with(&config(), None, Tee::Tpm, disk, &mut measure)
}

fn position(steps: &Steps, prefix: &str) -> Option<usize> {
    steps.borrow().iter().position(|s| s.starts_with(prefix))
}

/// The index of `prefix`, which must be there.
fn at(steps: &Steps, prefix: &str) -> usize {
    position(steps, prefix).unwrap_or_else(|| panic!("no step {prefix:?} in {:?}", steps.borrow()))
}

/// A blank disk formatted by the phase, and the steps that did it.
fn formatted() -> (Vec<u8>, Steps, Opened) {
    let steps = Steps::default();
    let mut disk = SimDisk::new(Vec::new(), &steps);
    let opened = run(&mut disk, None).unwrap();
    (disk.bytes, steps, opened)
}

#[test]
fn a_blank_disk_is_measured_before_its_key_is_derived_and_committed_only_after_mkfs() {
    let (bytes, steps, opened) = formatted();
    assert!(opened.formatted);
    assert!(steps
        .borrow()
        .contains(&format!("measure state-disk {}", opened.uuid)));
    assert!(at(&steps, "measure state-disk") < at(&steps, "provision"));
    assert!(at(&steps, "measure volume-key") < at(&steps, "map"));
    assert!(at(&steps, "mkfs") < at(&steps, "committed"));
    assert!(at(&steps, "committed") < at(&steps, "mount"));
    // The disk ends committed: the next boot opens it.
    assert!(matches!(
        classify(
            &bytes[..BLANK_PROBE as usize],
            MIN_FORMAT_SIZE,
            &policy(&config())
        ),
        DiskState::Ours(_)
    ));
}

#[test]
fn a_disk_of_ours_is_measured_before_its_key_is_derived_and_never_written() {
    let (bytes, _, first) = formatted();
    let steps = Steps::default();
    let mut disk = SimDisk::new(bytes.clone(), &steps);
    let opened = run(&mut disk, None).unwrap();
    assert!(!opened.formatted);
    assert_eq!(opened.uuid, first.uuid);
    assert!(at(&steps, &format!("measure state-disk {}", first.uuid)) < at(&steps, "recover"));
    assert!(at(&steps, "measure volume-key") < at(&steps, "map"));
    assert_eq!(position(&steps, "provision"), None);
    assert_eq!(position(&steps, "write"), None, "{:?}", steps.borrow());
    assert_eq!(position(&steps, "mkfs"), None);
    assert_eq!(disk.bytes, bytes);
    // The header is classified from its two copies: the metadata area is not read whole.
    assert_eq!(steps.borrow()[1], format!("read 0 {HEADER_PROBE}"));
    let rest = format!("read {HEADER_PROBE} {}", BLANK_PROBE - HEADER_PROBE);
    assert_eq!(position(&steps, &rest), None, "{:?}", steps.borrow());
}

#[test]
fn a_disk_is_blank_only_when_its_whole_metadata_area_is_zero() {
    // Zeros where both header copies would be, data further on: not blank, never written.
    for at in [HEADER_PROBE as usize, BLANK_PROBE as usize - 1] {
        let mut bytes = vec![0u8; BLANK_PROBE as usize];
        bytes[at] = 1;
        let steps = Steps::default();
        let mut disk = SimDisk::new(bytes.clone(), &steps);
        let err = run(&mut disk, None).err().unwrap();
        assert!(matches!(err, StateError::Foreign { .. }), "{at}: {err}");
        assert_eq!(position(&steps, "write"), None, "{:?}", steps.borrow());
        assert_eq!(disk.bytes[..bytes.len()], bytes[..]);
    }
    // All zeros: read whole, then formatted.
    let steps = Steps::default();
    let mut disk = SimDisk::new(Vec::new(), &steps);
    assert!(run(&mut disk, None).unwrap().formatted);
    assert_eq!(
        position(
            &steps,
            &format!("read {HEADER_PROBE} {}", BLANK_PROBE - HEADER_PROBE)
        ),
        Some(2),
        "{:?}",
        steps.borrow()
    );
}

#[test]
fn no_key_is_derived_when_the_identity_cannot_be_measured() {
    let (bytes, _, _) = formatted();
    for start in [Vec::new(), bytes] {
        let steps = Steps::default();
        let mut disk = SimDisk::new(start.clone(), &steps);
        let err = run(&mut disk, Some("measure state-disk")).err().unwrap();
        assert!(matches!(err, StateError::Measure(_)), "{err}");
        assert_eq!(position(&steps, "provision"), None, "{:?}", steps.borrow());
        assert_eq!(position(&steps, "recover"), None, "{:?}", steps.borrow());
        assert_eq!(position(&steps, "write"), None, "{:?}", steps.borrow());
        assert_eq!(disk.bytes[..start.len()], start[..]);
    }
}

#[test]
fn a_foreign_disk_is_never_written() {
    let mut ext4 = vec![0u8; 4096];
    ext4[1080..1082].copy_from_slice(&[0x53, 0xef]);
    let mut gpt = vec![0u8; 4096];
    gpt[512..520].copy_from_slice(b"EFI PART");
    let mut junk = vec![0u8; 4096];
    junk[77] = 1;
    let vk = vec![7u8; policy(&config()).key_size()];
    let other_luks = luks2::format(FormatInput {
        policy: policy(&config()),
        uuid: "11111111-2222-4333-8444-555555555555",
        secret: SECRET,
        volume_key: &vk,
        label: "someone-else",
        token: None,
        random: &mut luks2::kernel_random,
    })
    .unwrap();
    let (mut damaged, _, _) = formatted();
    damaged[0] ^= 1;
    for (what, bytes) in [
        ("ext4", ext4),
        ("gpt", gpt),
        ("junk", junk),
        ("another luks2", other_luks.to_vec()),
        ("a damaged header", damaged),
    ] {
        let steps = Steps::default();
        let mut disk = SimDisk::new(bytes.clone(), &steps);
        let before = disk.bytes.clone();
        let err = run(&mut disk, None).err().unwrap();
        assert!(matches!(err, StateError::Foreign { .. }), "{what}: {err}");
        for step in [
            "write",
            "measure",
            "provision",
            "recover",
            "map",
            "prepare",
            "mkfs",
            "mount",
        ] {
            assert_eq!(
                position(&steps, step),
                None,
                "{what}: {step} in {:?}",
                steps.borrow()
            );
        }
        assert!(disk.bytes == before, "{what}: the disk changed");
    }
}

#[test]
fn a_failed_mkfs_leaves_the_format_uncommitted() {
    let steps = Steps::default();
    let mut disk = SimDisk::new(Vec::new(), &steps);
    disk.mkfs_fails = true;
    let err = run(&mut disk, None).err().unwrap();
    assert!(matches!(err, StateError::Mkfs { .. }), "{err}");
    assert_eq!(position(&steps, "committed"), None, "{:?}", steps.borrow());
    assert_eq!(position(&steps, "mount"), None);
    // The next boot formats it again (nothing was stored on it).
    assert!(matches!(
        classify(
            &disk.bytes[..BLANK_PROBE as usize],
            MIN_FORMAT_SIZE,
            &policy(&config())
        ),
        DiskState::Uncommitted
    ));
}
