//! Device-mapper through the `devicemapper` crate's ioctls: no libdevmapper, no udev. A device
//! is used as `/dev/dm-<minor>`, which devtmpfs creates.

use devicemapper::{DevId, DmFlags, DmName, DmOptions, DM};

#[derive(Debug, thiserror::Error)]
pub enum DmError {
    #[error("cannot open /dev/mapper/control (is dm-mod loaded?)")]
    Control(#[source] devicemapper::DmError),
    #[error("invalid device-mapper name {0:?}")]
    Name(String),
    #[error("cannot {step} device-mapper device {name}")]
    Ioctl {
        step: &'static str,
        name: String,
        #[source]
        source: devicemapper::DmError,
    },
}

/// A mapped device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedDevice {
    pub name: String,
    pub major: u32,
    pub minor: u32,
}

impl MappedDevice {
    pub fn node(&self) -> String {
        format!("/dev/dm-{}", self.minor)
    }
}

/// Creates `name` with a single-target table and activates it. A failed load removes the
/// half-created device again.
pub fn create(
    name: &str,
    sectors: u64,
    target: &str,
    params: &str,
    read_only: bool,
) -> Result<MappedDevice, DmError> {
    let dm = DM::new().map_err(DmError::Control)?;
    let dm_name = DmName::new(name).map_err(|_| DmError::Name(name.to_string()))?;
    let id = DevId::Name(dm_name);
    let ioctl = |step: &'static str| {
        move |source| DmError::Ioctl {
            step,
            name: name.to_string(),
            source,
        }
    };
    dm.device_create(dm_name, None, DmOptions::default())
        .map_err(ioctl("create"))?;
    let mut flags = DmFlags::DM_SECURE_DATA;
    if read_only {
        flags |= DmFlags::DM_READONLY;
    }
    let table = [(0u64, sectors, target.to_string(), params.to_string())];
    let loaded = dm
        .table_load(&id, &table, DmOptions::default().set_flags(flags))
        .map_err(ioctl("load the table of"))
        .and_then(|_| {
            dm.device_suspend(&id, DmOptions::default())
                .map_err(ioctl("activate"))
        });
    match loaded {
        Ok(info) => {
            let dev = info.device();
            Ok(MappedDevice {
                name: name.to_string(),
                major: dev.major,
                minor: dev.minor,
            })
        }
        Err(e) => {
            let _ = dm.device_remove(&id, DmOptions::default());
            Err(e)
        }
    }
}

/// Removes `name` (used for the short-lived device that lets the kernel format dm-integrity).
pub fn remove(name: &str) -> Result<(), DmError> {
    let dm = DM::new().map_err(DmError::Control)?;
    let dm_name = DmName::new(name).map_err(|_| DmError::Name(name.to_string()))?;
    dm.device_remove(&DevId::Name(dm_name), DmOptions::default())
        .map_err(|source| DmError::Ioctl {
            step: "remove",
            name: name.to_string(),
            source,
        })?;
    Ok(())
}

/// Opens the control device; at shutdown this happens before /dev is unmounted.
pub fn control() -> Option<DM> {
    DM::new().ok()
}

/// Removes every device-mapper device nothing holds open, in rounds, so that a stack goes from
/// the top down; returns the names removed. Removing flushes what a target buffers (dm-integrity
/// writes its journal out to the data area and marks itself clean). Devices still in use (the
/// root) stay.
pub fn remove_unused(dm: &DM) -> Vec<String> {
    let mut removed = Vec::new();
    loop {
        let Ok(devices) = dm.list_devices() else {
            return removed;
        };
        let before = removed.len();
        for (name, _, _) in devices {
            if dm
                .device_remove(&DevId::Name(&name), DmOptions::default())
                .is_ok()
            {
                removed.push(name.to_string());
            }
        }
        if removed.len() == before {
            return removed;
        }
    }
}
