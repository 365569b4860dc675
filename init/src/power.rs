//! The ACPI power button (what a cloud's "stop" and QEMU's `system_powerdown` press): the
//! `button` driver reports it as KEY_POWER on an input device, read here through evdev. Any
//! input device that can send KEY_POWER (a keyboard's power key too) is listened to.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// `struct input_event` on 64-bit Linux: a 16-byte timeval, u16 type, u16 code, i32 value.
const EVENT_SIZE: usize = 24;

/// True when an input device's `capabilities/key` bitmap (hex words, most significant first,
/// each `long` wide) has the KEY_POWER bit.
pub fn has_power_key(bitmap: &str) -> bool {
    let words: Vec<&str> = bitmap.split_whitespace().collect();
    let bits_per_word = usize::BITS as usize;
    let index = KEY_POWER as usize / bits_per_word;
    let Some(word) = words.len().checked_sub(1 + index).map(|i| words[i]) else {
        return false;
    };
    u64::from_str_radix(word, 16)
        .is_ok_and(|w| w & (1 << (KEY_POWER as usize % bits_per_word)) != 0)
}

/// True when a chunk of input events contains a power key press.
pub fn is_power_press(events: &[u8]) -> bool {
    events.chunks_exact(EVENT_SIZE).any(|e| {
        let kind = u16::from_ne_bytes([e[16], e[17]]);
        let code = u16::from_ne_bytes([e[18], e[19]]);
        let value = i32::from_ne_bytes([e[20], e[21], e[22], e[23]]);
        kind == EV_KEY && code == KEY_POWER && value == 1
    })
}

/// A power button input device, open for non-blocking reads.
pub struct PowerButton {
    pub name: String,
    pub file: File,
}

impl PowerButton {
    /// Reads pending events; true when the button was pressed.
    pub fn pressed(&mut self) -> bool {
        let mut buf = [0u8; EVENT_SIZE * 16];
        let mut pressed = false;
        while let Ok(n) = self.file.read(&mut buf) {
            if n == 0 {
                break;
            }
            pressed |= is_power_press(&buf[..n]);
        }
        pressed
    }
}

/// Opens every input device that can report KEY_POWER.
pub fn find_power_buttons(sysfs_input: &Path, dev_input: &Path) -> Vec<PowerButton> {
    let mut buttons = Vec::new();
    let Ok(entries) = fs::read_dir(sysfs_input) else {
        return buttons;
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("event"))
        .collect();
    names.sort();
    for event in names {
        let device = sysfs_input.join(&event).join("device");
        let Ok(caps) = fs::read_to_string(device.join("capabilities/key")) else {
            continue;
        };
        if !has_power_key(&caps) {
            continue;
        }
        let name = fs::read_to_string(device.join("name"))
            .map(|n| n.trim().to_string())
            .unwrap_or_else(|_| event.clone());
        match OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
            .open(dev_input.join(&event))
        {
            Ok(file) => buttons.push(PowerButton { name, file }),
            Err(e) => log::warn!("cannot open power button {event} ({name}): {e}"),
        }
    }
    buttons
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> Vec<u8> {
        let mut e = vec![0u8; 16];
        e.extend_from_slice(&kind.to_ne_bytes());
        e.extend_from_slice(&code.to_ne_bytes());
        e.extend_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn power_key_bit_is_found() {
        // What the ACPI power button of a QEMU q35 guest reports: only KEY_POWER (bit 116).
        assert!(has_power_key("10000000000000 0\n"));
        assert!(!has_power_key("0 0"));
        assert!(!has_power_key("10000000000000"));
        assert!(!has_power_key(""));
        assert!(!has_power_key("zz 0"));
    }

    #[test]
    fn only_a_press_counts() {
        let mut events = event(EV_KEY, KEY_POWER, 0);
        events.extend(event(0, 0, 0));
        assert!(!is_power_press(&events));
        events.extend(event(EV_KEY, KEY_POWER, 1));
        assert!(is_power_press(&events));
        assert!(!is_power_press(&event(EV_KEY, 115, 1)));
    }
}
