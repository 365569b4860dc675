//! One boot drawn as an SVG from its serial console, as `systemd-analyze plot` draws a systemd
//! boot: firmware, kernel, cvm-init, each of its phases and each service until ready, on one
//! time axis with the durations written beside the bars.
//!
//! Two forms of log are read:
//! - the timed copy of the console the QEMU harness writes beside `serial.log`
//!   (`serial.timed.log`): every line `<seconds since QEMU start, 3 decimals> <console line>`.
//!   The axis starts at QEMU's start, so the firmware has a bar; the kernel's start is placed
//!   where its timestamped lines say it was (arrival minus the kernel's own timestamp, the
//!   smallest over its lines, since the console may print early lines late).
//! - a plain console log whose cvm-init lines carry the kernel's `[    1.234567]` stamps (a boot
//!   with `loglevel=7`, as `make bench` runs it, where the kernel echoes the init's lines). The
//!   axis starts at the kernel's start; the firmware is not seen. The init's first lines come
//!   before it opens /dev/kmsg and carry no stamp: `starting` takes the kernel's last stamp
//!   (`Run /init as init process`) and those first phases their own durations.
//!
//! A plain log whose init lines carry no stamps (a `quiet` boot) is refused rather than drawn
//! from the phases' own `ok Nms` laid end to end: the gaps between phases (services, the
//! console itself) would be invisible and the picture would claim a precision it does not have.
//!
//! Bars take their place from the times of the lines. A phase's label is the duration
//! cvm-init measured itself (`phase NAME ok 46ms`), exact where a line's arrival is not; a
//! service's bar runs from its `started` line (after its binary was measured and executed) to
//! its `ready` line, the service's own start-up.
//!
//! The console is written by the host: every piece of log text that reaches the SVG is
//! XML-escaped (and stripped of characters XML cannot carry), and every piece in an error has
//! its control characters escaped. The first boot in the log is drawn; a second
//! `cvm-init: starting` ends it.
//!
//! The SVG is written by hand: it is a few dozen rectangles, lines and texts, and the one thing
//! a library would add, escaping, is a short function here that must also drop what XML cannot
//! hold.

use std::collections::HashMap;
use std::fmt::Write as _;

/// The prefix of the init's own console lines (`init/src/logger.rs`).
const PREFIX: &str = "cvm-init: ";

/// Times beyond this many seconds are not a boot (and would make an SVG kilometres wide).
const MAX_SECONDS: f64 = 1.0e6;

/// More phases and services than this are not one boot (and would make an SVG of megabytes).
const MAX_BARS: usize = 1000;

/// The longest name shown; longer ones are cut with an ellipsis.
const MAX_NAME: usize = 48;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TimelineError {
    #[error("the log is empty")]
    Empty,
    #[error("no `cvm-init: starting` line: not the console of a cvm-init boot")]
    NoStart,
    #[error(
        "line {line}: `{text}` carries no time: expected the timed copy of the console \
         (serial.timed.log, `<seconds> <line>`) or a boot with loglevel=7, whose kernel stamps \
         the init's lines `[    1.234567]`"
    )]
    Untimed { line: usize, text: String },
    #[error("line {line}: time {time:.3} s goes back before {previous:.3} s of an earlier line")]
    Backwards {
        line: usize,
        time: f64,
        previous: f64,
    },
    #[error("line {line}: expected a time below {MAX_SECONDS} s, found `{text}`")]
    BadTime { line: usize, text: String },
    #[error("line {line}: `{text}` comes before `cvm-init: starting`")]
    BeforeStart { line: usize, text: String },
    #[error("line {line}: phase {name} ends without its start")]
    EndWithoutStart { line: usize, name: String },
    #[error("line {line}: phase {name} starts again while it runs")]
    StartedTwice { line: usize, name: String },
    #[error("line {line}: expected `phase NAME start`, `phase NAME ok <N>ms` or `error: phase NAME failed: …`, found `{text}`")]
    BadPhase { line: usize, text: String },
    #[error("line {line}: more than {MAX_BARS} phases and services: not the console of one boot")]
    TooMany { line: usize },
    #[error("line {line}: service {name} ready (or not) without its start")]
    ReadyWithoutStart { line: usize, name: String },
}

/// Where the time axis starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// QEMU's start (the timed copy of the console).
    QemuStart,
    /// The kernel's start (its own timestamps).
    KernelStart,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Firmware,
    Kernel,
    /// Firmware and kernel together, when no kernel line carries a timestamp.
    FirmwareAndKernel,
    /// cvm-init from its first line to `cvm-init: ready`.
    Init,
    Phase,
    Service,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// `phase NAME failed` or `service NAME not ready`.
    Failed,
    /// Still running when the log (or the boot) ends.
    Unfinished,
    /// A service that started and never said it was ready (it may have no readiness socket).
    StartedOnly,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub kind: Kind,
    /// Log text, unescaped: escape it where it is shown.
    pub name: String,
    /// Seconds from the origin.
    pub start: f64,
    pub end: f64,
    /// The duration written beside the bar, in milliseconds.
    pub label_ms: f64,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    pub origin: Origin,
    pub bars: Vec<Bar>,
    /// `cvm-init: ready`, seconds from the origin.
    pub ready: Option<f64>,
    /// The last time seen in the boot.
    pub end: f64,
}

/// One line of the log with its time and number.
struct Line<'a> {
    number: usize,
    time: Option<f64>,
    /// The kernel's own stamp, if the line has one.
    kernel_stamp: Option<f64>,
    /// The console text after any stamp.
    text: &'a str,
}

/// `<digits>.<3 digits> ` at the start: the timed copy's form.
fn split_timed(line: &str) -> Option<(f64, &str)> {
    let (time, rest) = line.split_once(' ')?;
    let (whole, frac) = time.split_once('.')?;
    if whole.is_empty()
        || whole.len() > 12
        || frac.len() != 3
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some((time.parse().ok()?, rest))
}

/// The kernel's `[    1.234567] ` stamp at the start of a console line.
fn split_kernel_stamp(line: &str) -> Option<(f64, &str)> {
    let inner = line.strip_prefix('[')?;
    let (stamp, rest) = inner.split_once(']')?;
    let stamp = stamp.trim_start_matches(' ');
    let (whole, frac) = stamp.split_once('.')?;
    if whole.is_empty()
        || whole.len() > 12
        || frac.is_empty()
        || frac.len() > 9
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some((stamp.parse().ok()?, rest.strip_prefix(' ').unwrap_or(rest)))
}

/// Control characters (and the Unicode ones that reorder or hide text) as `\xNN` / `\u{…}`,
/// cut to a readable length: log text for an error message.
pub fn escape_for_error(text: &str) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == 120 {
            out.push('…');
            break;
        }
        match c {
            c if (c as u32) < 0x20 || c == '\x7f' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            '\u{80}'..='\u{9f}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}' => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// A name from the log for the SVG: cut if long, then escaped.
fn shown(name: &str) -> String {
    match name.char_indices().nth(MAX_NAME) {
        Some((cut, _)) => format!("{}…", escape_xml(&name[..cut])),
        None => escape_xml(name),
    }
}

/// Text for the SVG: XML's five special characters as entities, and every character XML 1.0
/// cannot hold (or that reorders text) replaced by U+FFFD.
pub fn escape_xml(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20
                || ('\u{7f}'..='\u{9f}').contains(&c)
                || ('\u{200b}'..='\u{200f}').contains(&c)
                || ('\u{2028}'..='\u{202e}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c)
                || c == '\u{fffe}'
                || c == '\u{ffff}' =>
            {
                out.push('\u{fffd}')
            }
            c => out.push(c),
        }
    }
    out
}

/// `NNNms` → NNN.
fn parse_ms(text: &str) -> Option<f64> {
    let digits = text.strip_suffix("ms")?;
    if digits.is_empty() || digits.len() > 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn is_starting(init_text: &str) -> bool {
    init_text == "starting" || init_text.starts_with("starting ")
}

/// Splits the log into lines with their times, checking that time never goes back.
/// Whether the log is the timed copy: every line starts with `<seconds> `.
fn lines(text: &str) -> Result<(Vec<Line<'_>>, bool), TimelineError> {
    let raw: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let timed = raw
        .iter()
        .filter(|l| !l.is_empty())
        .all(|l| split_timed(l).is_some());
    let mut out = Vec::with_capacity(raw.len());
    let mut previous: Option<f64> = None;
    for (i, line) in raw.into_iter().enumerate() {
        let number = i + 1;
        if line.is_empty() {
            continue;
        }
        let (arrival, console) = if timed {
            let (t, rest) = split_timed(line).expect("checked above");
            (Some(t), rest)
        } else {
            (None, line)
        };
        let (kernel_stamp, text) = match split_kernel_stamp(console) {
            Some((s, rest)) => (Some(s), rest),
            None => (None, console),
        };
        let time = if timed { arrival } else { kernel_stamp };
        if let Some(t) = time {
            if !t.is_finite() || t >= MAX_SECONDS {
                return Err(TimelineError::BadTime {
                    line: number,
                    text: escape_for_error(line),
                });
            }
            if let Some(p) = previous {
                if t < p {
                    return Err(TimelineError::Backwards {
                        line: number,
                        time: t,
                        previous: p,
                    });
                }
            }
            previous = Some(t);
        }
        out.push(Line {
            number,
            time,
            kernel_stamp,
            text,
        });
    }
    Ok((out, timed))
}

/// The time of the init's lines. In the timed copy every line has one. In a plain log the
/// init's first lines come before it opens /dev/kmsg, so the kernel does not stamp them: they
/// are placed from the last time known (a phase's end from its own duration). Once one of the
/// init's lines carries a stamp, all later ones must (else the boot was `quiet` and only its
/// errors were stamped).
struct Clock {
    stamped_seen: bool,
    /// The latest time known, given or derived.
    last: f64,
}

impl Clock {
    /// `Some(time)` of the line, `None` for an early unstamped line whose time is derived.
    fn at(&mut self, line: &Line) -> Result<Option<f64>, TimelineError> {
        match line.time {
            Some(t) => {
                if line.kernel_stamp == Some(t) {
                    self.stamped_seen = true;
                }
                self.last = self.last.max(t);
                Ok(Some(t))
            }
            None if !self.stamped_seen => Ok(None),
            None => Err(TimelineError::Untimed {
                line: line.number,
                text: escape_for_error(line.text),
            }),
        }
    }

    fn at_or_last(&mut self, line: &Line) -> Result<f64, TimelineError> {
        Ok(self.at(line)?.unwrap_or(self.last))
    }
}

/// Reads a boot from its console log (either form, see the module's comment).
pub fn parse(bytes: &[u8]) -> Result<Timeline, TimelineError> {
    let text = String::from_utf8_lossy(bytes);
    let (lines, timed) = lines(&text)?;
    if lines.is_empty() {
        return Err(TimelineError::Empty);
    }
    let origin = if timed {
        Origin::QemuStart
    } else {
        Origin::KernelStart
    };
    let start_index = lines
        .iter()
        .position(|l| l.text.strip_prefix(PREFIX).is_some_and(is_starting))
        .ok_or(TimelineError::NoStart)?;
    let before = &lines[..start_index];
    if let Some(l) = before.iter().find(|l| l.text.starts_with(PREFIX)) {
        return Err(TimelineError::BeforeStart {
            line: l.number,
            text: escape_for_error(l.text),
        });
    }
    let starting = &lines[start_index];
    // The kernel's last stamp before the init: `Run /init as init process`, in a plain log.
    let last_before = before.iter().filter_map(|l| l.time).fold(0.0, f64::max);
    let mut clock = Clock {
        stamped_seen: false,
        last: last_before,
    };
    let init_start = clock.at_or_last(starting)?;

    let mut bars = Vec::new();
    match origin {
        Origin::QemuStart => {
            // Lines printed late (the console comes up after the kernel's first lines) say
            // the kernel started no later than their arrival minus their stamp.
            let kernel_start = before
                .iter()
                .filter_map(|l| Some(l.time? - l.kernel_stamp?))
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v))))
                .map(|v| v.clamp(0.0, init_start));
            match kernel_start {
                Some(k) => {
                    bars.push(span(Kind::Firmware, "firmware", 0.0, k));
                    bars.push(span(Kind::Kernel, "kernel", k, init_start));
                }
                None => bars.push(span(
                    Kind::FirmwareAndKernel,
                    "firmware and kernel",
                    0.0,
                    init_start,
                )),
            }
        }
        Origin::KernelStart => bars.push(span(Kind::Kernel, "kernel", 0.0, init_start)),
    }
    let init_bar = bars.len();
    bars.push(span(Kind::Init, "cvm-init", init_start, init_start));

    let mut ready = None;
    // Open phases and known services: name → index in `bars`.
    let mut open_phases: HashMap<&str, usize> = HashMap::new();
    let mut services: HashMap<&str, usize> = HashMap::new();
    for line in &lines[start_index + 1..] {
        let Some(init) = line.text.strip_prefix(PREFIX) else {
            if let Some(t) = line.time {
                clock.last = clock.last.max(t);
            }
            continue;
        };
        if is_starting(init) {
            // A second boot: this picture is of the first.
            break;
        }
        // A failed phase and a service killed for not becoming ready are errors
        // (`cvm-init: error: phase NAME failed: …`); their start and end are not.
        let (is_error, init) = match init.strip_prefix("error: ") {
            Some(rest) => (true, rest),
            None => (false, init),
        };
        if let Some(rest) = init.strip_prefix("phase ") {
            let bad = || TimelineError::BadPhase {
                line: line.number,
                text: escape_for_error(line.text),
            };
            let (name, verb) = rest.split_once(' ').ok_or_else(bad)?;
            let open = open_phases.get(name).copied();
            if is_error != verb.starts_with("failed") {
                return Err(bad());
            }
            if verb == "start" {
                let t = clock.at_or_last(line)?;
                if open.is_some() {
                    return Err(TimelineError::StartedTwice {
                        line: line.number,
                        name: escape_for_error(name),
                    });
                }
                too_many(&bars, line)?;
                open_phases.insert(name, bars.len());
                let mut bar = span(Kind::Phase, name, t, t);
                bar.outcome = Outcome::Unfinished;
                bars.push(bar);
            } else if verb == "ok" || verb.starts_with("ok ") || verb.starts_with("failed") {
                let Some(index) = open else {
                    return Err(TimelineError::EndWithoutStart {
                        line: line.number,
                        name: escape_for_error(name),
                    });
                };
                let given = clock.at(line)?;
                open_phases.remove(name);
                let bar = &mut bars[index];
                if let Some(duration) = verb.strip_prefix("ok ") {
                    let ms = parse_ms(duration).ok_or_else(bad)?;
                    bar.end = given.unwrap_or(bar.start + ms / 1000.0);
                    bar.label_ms = ms;
                    bar.outcome = Outcome::Done;
                } else if verb.starts_with("failed") {
                    bar.end = given.unwrap_or(clock.last);
                    bar.label_ms = (bar.end - bar.start) * 1000.0;
                    bar.outcome = Outcome::Failed;
                } else {
                    return Err(bad());
                }
                clock.last = clock.last.max(bar.end);
            } else {
                return Err(bad());
            }
        } else if let Some(rest) = init.strip_prefix("service ") {
            let Some((name, what)) = rest.split_once(' ') else {
                continue;
            };
            let known = services.get(name).copied();
            if is_error != what.starts_with("not ready: ") {
                // Other errors about a service (it could not be measured, or started) leave
                // its bar as it is; its restarts show on the console.
                continue;
            }
            if what.starts_with("started: ") {
                let t = clock.at_or_last(line)?;
                // A restart keeps the first start: the wait for ready includes it.
                if known.is_none() {
                    too_many(&bars, line)?;
                    services.insert(name, bars.len());
                    let mut bar = span(Kind::Service, name, t, t);
                    bar.outcome = Outcome::StartedOnly;
                    bars.push(bar);
                }
            } else if what.starts_with("ready: ") || what.starts_with("not ready: ") {
                let t = clock.at_or_last(line)?;
                let Some(index) = known else {
                    return Err(TimelineError::ReadyWithoutStart {
                        line: line.number,
                        name: escape_for_error(name),
                    });
                };
                let bar = &mut bars[index];
                if bar.outcome == Outcome::StartedOnly {
                    bar.end = t;
                    bar.label_ms = (t - bar.start) * 1000.0;
                    bar.outcome = if what.starts_with("ready: ") {
                        Outcome::Done
                    } else {
                        Outcome::Failed
                    };
                }
            }
        } else if init == "ready" && ready.is_none() {
            ready = Some(clock.at_or_last(line)?);
        }
    }
    if !timed && !clock.stamped_seen {
        // Nothing the init printed carries a time: a `quiet` boot.
        return Err(TimelineError::Untimed {
            line: starting.number,
            text: escape_for_error(starting.text),
        });
    }
    let end = clock.last;
    for index in open_phases.into_values() {
        bars[index].end = end;
        bars[index].label_ms = (end - bars[index].start) * 1000.0;
    }
    let init = &mut bars[init_bar];
    init.end = ready.unwrap_or(end);
    init.label_ms = (init.end - init.start) * 1000.0;
    if ready.is_none() {
        init.outcome = Outcome::Unfinished;
    }
    Ok(Timeline {
        origin,
        bars,
        ready,
        end,
    })
}

fn too_many(bars: &[Bar], line: &Line) -> Result<(), TimelineError> {
    if bars.len() >= MAX_BARS {
        return Err(TimelineError::TooMany { line: line.number });
    }
    Ok(())
}

fn span(kind: Kind, name: &str, start: f64, end: f64) -> Bar {
    Bar {
        kind,
        name: name.to_string(),
        start,
        end,
        label_ms: (end - start) * 1000.0,
        outcome: Outcome::Done,
    }
}

/// `46 ms`, `3.18 s`.
pub fn human(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

/// Grid spacing in seconds: at most about 25 lines across the boot.
fn tick_step(total: f64) -> f64 {
    let mut step = 0.1;
    for candidate in [0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0] {
        step = candidate;
        if total / candidate <= 25.0 {
            break;
        }
    }
    while total / step > 25.0 {
        step *= 10.0;
    }
    step
}

const PLOT_WIDTH: f64 = 1000.0;
const LEFT: f64 = 20.0;
const LABEL_ROOM: f64 = 340.0;
const TOP: f64 = 70.0;
const ROW: f64 = 22.0;
const BAR: f64 = 16.0;

impl Timeline {
    /// The picture as SVG text; `caption` (escaped here) names the boot in the title.
    pub fn to_svg(&self, caption: &str) -> String {
        let total = self
            .bars
            .iter()
            .map(|b| b.end)
            .chain(self.ready)
            .fold(self.end, f64::max)
            .max(0.001);
        let scale = PLOT_WIDTH / total;
        let x = |t: f64| LEFT + t * scale;
        let width = LEFT + PLOT_WIDTH + LABEL_ROOM;
        let height = TOP + ROW * self.bars.len() as f64 + 30.0;
        let origin = match self.origin {
            Origin::QemuStart => "QEMU's start",
            Origin::KernelStart => "the kernel's start (firmware not seen)",
        };
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">
<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="#ffffff"/>"##
        );
        let headline = match self.ready {
            Some(r) => format!("cvm-init: ready {r:.3} s after {origin}"),
            None => format!("no `cvm-init: ready` line; the log ends {total:.3} s after {origin}"),
        };
        let _ = writeln!(
            svg,
            r#"<text x="{LEFT}" y="20" font-size="15" font-weight="bold">Boot timeline: {}</text>
<text x="{LEFT}" y="38">{}</text>"#,
            shown(caption),
            escape_xml(&headline),
        );
        // The grid.
        let step = tick_step(total);
        let bottom = TOP + ROW * self.bars.len() as f64;
        let mut tick = 0.0;
        let mut n = 0u32;
        while tick <= total + 1e-9 {
            let tx = x(tick);
            let _ = writeln!(
                svg,
                r##"<line x1="{tx:.1}" y1="{:.1}" x2="{tx:.1}" y2="{bottom:.1}" stroke="#dddddd"/>
<text x="{tx:.1}" y="{:.1}" text-anchor="middle" fill="#555555">{} s</text>"##,
                TOP - 12.0,
                TOP - 16.0,
                trim_float(tick),
            );
            n += 1;
            tick = f64::from(n) * step;
        }
        // The ready line under the bars, so that their labels stay readable across it.
        if let Some(r) = self.ready {
            let rx = x(r);
            let _ = writeln!(
                svg,
                r##"<line x1="{rx:.1}" y1="{:.1}" x2="{rx:.1}" y2="{bottom:.1}" stroke="#d62728" stroke-width="2"/>
<text x="{rx:.1}" y="{:.1}" fill="#d62728" text-anchor="middle">ready {r:.3} s</text>"##,
                TOP - 8.0,
                bottom + 16.0,
            );
        }
        for (row, bar) in self.bars.iter().enumerate() {
            let y = TOP + ROW * row as f64 + (ROW - BAR) / 2.0;
            let x0 = x(bar.start);
            let w = ((bar.end - bar.start) * scale).max(1.0);
            let (fill, stroke) = colours(bar);
            let note = match bar.outcome {
                Outcome::Done => String::new(),
                Outcome::Failed => " (failed)".to_string(),
                Outcome::Unfinished => " (unfinished)".to_string(),
                Outcome::StartedOnly => " (started; no ready line)".to_string(),
            };
            let label = match bar.outcome {
                Outcome::StartedOnly => format!("{}{note}", shown(&bar.name)),
                _ => format!("{} {}{note}", shown(&bar.name), human(bar.label_ms)),
            };
            let _ = writeln!(
                svg,
                r#"<g><title>{} from {:.3} s to {:.3} s</title><rect x="{x0:.1}" y="{y:.1}" width="{w:.1}" height="{BAR}" fill="{fill}" stroke="{stroke}"/><text x="{:.1}" y="{:.1}">{}</text></g>"#,
                shown(&bar.name),
                bar.start,
                bar.end,
                x0 + w + 4.0,
                y + BAR - 4.0,
                label,
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

fn colours(bar: &Bar) -> (&'static str, &'static str) {
    match bar.outcome {
        Outcome::Failed => return ("#e05a5a", "#a02020"),
        Outcome::Unfinished => return ("#f3c0c0", "#a02020"),
        _ => {}
    }
    match bar.kind {
        Kind::Firmware => ("#b0b0b0", "#808080"),
        Kind::Kernel => ("#f0a04b", "#c07020"),
        Kind::FirmwareAndKernel => ("#d0a880", "#a07040"),
        Kind::Init => ("#3b6fd6", "#2050b0"),
        Kind::Phase => ("#8fbcff", "#4a80d0"),
        Kind::Service => ("#6cc070", "#3a8a3e"),
    }
}

/// The SVG of the boot in `log` (either form), for the harness and the CLI.
pub fn svg_from_log(log: &[u8], caption: &str) -> Result<String, TimelineError> {
    Ok(parse(log)?.to_svg(caption))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real boot (`cvm-harness bench-node`, first boot of the node with containerd): the
    /// harness's timed copy of the console, and the console itself.
    const TIMED: &[u8] = include_bytes!("../tests/data/boot-node-first.timed.log");
    const PLAIN: &[u8] = include_bytes!("../tests/data/boot-node-first.serial.log");

    const PHASES: [(&str, f64); 15] = [
        ("mounts", 44.0),
        ("config", 9.0),
        ("modules", 2673.0),
        ("devices", 215.0),
        ("configfs", 0.0),
        ("measure", 28.0),
        ("verity-root", 114.0),
        ("mount-root", 13.0),
        ("switch-root", 47.0),
        ("config-file", 45.0),
        ("network", 44.0),
        ("state", 5507.0),
        ("power-button", 14.0),
        ("services", 1986.0),
        ("measure-ready", 28.0),
    ];

    fn bar<'a>(t: &'a Timeline, name: &str) -> &'a Bar {
        t.bars
            .iter()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no bar {name}"))
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn a_real_timed_boot_has_firmware_kernel_every_phase_and_the_services() {
        let t = parse(TIMED).unwrap();
        assert_eq!(t.origin, Origin::QemuStart);
        // The kernel's first line arrives at 2.210 s stamped 0.000000, but later lines show the
        // console ran late: `Run /init` arrives at 5.999 stamped 4.070409.
        let firmware = bar(&t, "firmware");
        assert_eq!(firmware.start, 0.0);
        assert!(firmware.end > 1.9 && firmware.end < 2.21, "{firmware:?}");
        let kernel = bar(&t, "kernel");
        assert!(close(kernel.start, firmware.end));
        assert!(close(kernel.end, 6.147), "{kernel:?}");
        assert!(close(bar(&t, "cvm-init").start, 6.147));
        assert!(close(bar(&t, "cvm-init").end, 19.016));
        assert_eq!(t.ready, Some(19.016));
        assert_eq!(phase_labels(&t), PHASES);
        let modules = bar(&t, "modules");
        assert!(close(modules.start, 6.228) && close(modules.end, 8.898));
        assert!(t
            .bars
            .iter()
            .filter(|b| b.kind == Kind::Phase)
            .all(|b| b.outcome == Outcome::Done));
        // containerd from its exec (the `started` line) to its socket accepting.
        let containerd = bar(&t, "containerd");
        assert_eq!(containerd.kind, Kind::Service);
        assert_eq!(containerd.outcome, Outcome::Done);
        assert!(close(containerd.start, 16.926) && close(containerd.end, 18.706));
        assert!(close(containerd.label_ms, 1780.0));
        // The kubelet has no readiness socket: it only starts.
        assert_eq!(bar(&t, "kubelet").outcome, Outcome::StartedOnly);
        // Bars never run backwards, and the whole boot is within the log.
        assert!(t.bars.iter().all(|b| b.end >= b.start && b.end <= t.end));
    }

    /// Each phase's name and the duration written beside it.
    fn phase_labels(t: &Timeline) -> Vec<(&str, f64)> {
        t.bars
            .iter()
            .filter(|b| b.kind == Kind::Phase)
            .map(|b| (b.name.as_str(), b.label_ms))
            .collect()
    }

    #[test]
    fn the_same_boot_from_the_plain_console_starts_at_the_kernel() {
        let t = parse(PLAIN).unwrap();
        assert_eq!(t.origin, Origin::KernelStart);
        assert!(t.bars.iter().all(|b| b.kind != Kind::Firmware));
        // `Run /init as init process` is the last stamp before the init's first line.
        assert!(close(bar(&t, "kernel").end, 4.070409));
        // The init's first lines come before /dev/kmsg: mounts is placed by its own duration.
        let mounts = bar(&t, "mounts");
        assert!(close(mounts.start, 4.070409) && close(mounts.end, 4.114409));
        assert!(close(bar(&t, "modules").start, 4.298209));
        assert!(close(bar(&t, "modules").end, 6.971763));
        assert_eq!(t.ready, Some(17.086588));
        assert_eq!(phase_labels(&t), PHASES);
        let containerd = bar(&t, "containerd");
        assert!(close(containerd.start, 14.995175) && close(containerd.end, 16.778794));
    }

    fn error(log: &str) -> TimelineError {
        parse(log.as_bytes()).unwrap_err()
    }

    const HEAD: &str = "0.100 [    0.000000] Linux version 6.12\n\
                        0.900 [    0.700000] Run /init as init process\n\
                        1.000 cvm-init: starting version 0.1.0\n";

    #[test]
    fn a_small_timed_boot_and_its_svg() {
        let log = format!(
            "{HEAD}1.010 cvm-init: phase mounts start\n\
             1.060 cvm-init: phase mounts ok 50ms\n\
             1.100 cvm-init: service app started: pid 9 (/bin/app)\n\
             1.300 cvm-init: service app ready: /run/app.sock accepts connections after 200ms\n\
             1.400 cvm-init: ready\n"
        );
        let t = parse(log.as_bytes()).unwrap();
        assert!(close(bar(&t, "firmware").end, 0.1));
        assert!(close(bar(&t, "kernel").end, 1.0));
        assert!(close(bar(&t, "mounts").label_ms, 50.0));
        assert!(close(bar(&t, "app").label_ms, 200.0));
        let svg = t.to_svg("test");
        assert!(svg.contains(">mounts 50 ms<"), "{svg}");
        assert!(svg.contains(">app 200 ms<"), "{svg}");
        assert!(svg.contains(">firmware 100 ms<"), "{svg}");
        assert!(svg.contains(">kernel 900 ms<"), "{svg}");
        assert!(svg.contains("ready 1.400 s"), "{svg}");
        well_formed(&svg);
    }

    #[test]
    fn a_log_without_the_init_start_is_refused() {
        assert_eq!(error(""), TimelineError::Empty);
        assert_eq!(
            error("[    0.000000] Linux version 6.12\n"),
            TimelineError::NoStart
        );
        let e = error("0.100 [    0.000000] Linux\n0.200 cvm-init: phase mounts start\n");
        assert_eq!(e, TimelineError::NoStart);
    }

    #[test]
    fn init_lines_before_its_start_are_refused_by_line() {
        let e =
            error("0.100 cvm-init: phase mounts start\n0.200 cvm-init: starting version 0.1.0\n");
        assert!(
            matches!(e, TimelineError::BeforeStart { line: 1, .. }),
            "{e}"
        );
    }

    #[test]
    fn an_end_without_its_start_names_the_line() {
        let e = error(&format!("{HEAD}1.010 cvm-init: phase mounts ok 5ms\n"));
        assert_eq!(
            e,
            TimelineError::EndWithoutStart {
                line: 4,
                name: "mounts".into()
            }
        );
        assert_eq!(e.to_string(), "line 4: phase mounts ends without its start");
        let e = error(&format!(
            "{HEAD}1.010 cvm-init: error: phase mounts failed: no\n"
        ));
        assert!(matches!(e, TimelineError::EndWithoutStart { line: 4, .. }));
    }

    #[test]
    fn a_phase_started_twice_or_garbled_is_refused() {
        let e = error(&format!(
            "{HEAD}1.010 cvm-init: phase a start\n1.020 cvm-init: phase a start\n"
        ));
        assert!(
            matches!(e, TimelineError::StartedTwice { line: 5, .. }),
            "{e}"
        );
        for bad in [
            "phase a ok 5",
            "phase a ok fivems",
            "phase a done",
            "phase a",
        ] {
            let e = error(&format!(
                "{HEAD}1.010 cvm-init: phase a start\n1.020 cvm-init: {bad}\n"
            ));
            assert!(
                matches!(e, TimelineError::BadPhase { line: 5, .. }),
                "{bad}: {e}"
            );
            assert!(e
                .to_string()
                .starts_with("line 5: expected `phase NAME start`"));
        }
    }

    #[test]
    fn time_going_back_names_the_line() {
        let e = error(&format!("{HEAD}0.500 cvm-init: phase a start\n"));
        assert_eq!(
            e,
            TimelineError::Backwards {
                line: 4,
                time: 0.5,
                previous: 1.0
            }
        );
        assert_eq!(
            e.to_string(),
            "line 4: time 0.500 s goes back before 1.000 s of an earlier line"
        );
        // The kernel's stamps in a plain log too.
        let e = error("[    2.000000] a\n[    1.000000] b\n");
        assert!(matches!(e, TimelineError::Backwards { line: 2, .. }), "{e}");
    }

    #[test]
    fn an_absurd_time_is_refused() {
        let e = error("99999999.000 cvm-init: starting\n");
        assert!(matches!(e, TimelineError::BadTime { line: 1, .. }), "{e}");
    }

    #[test]
    fn a_quiet_plain_log_is_refused_rather_than_guessed() {
        let log = "[    0.040000] x\ncvm-init: starting version 0.1.0\n\
                   cvm-init: phase mounts start\ncvm-init: phase mounts ok 4ms\ncvm-init: ready\n";
        let e = error(log);
        assert!(matches!(e, TimelineError::Untimed { line: 2, .. }), "{e}");
        assert!(e.to_string().contains("loglevel=7"), "{e}");
        // Stamped, then not: the unstamped line is named.
        let log = "[    0.040000] x\ncvm-init: starting version 0.1.0\n\
                   [    0.100000] cvm-init: phase mounts start\ncvm-init: phase mounts ok 4ms\n";
        let e = error(log);
        assert!(matches!(e, TimelineError::Untimed { line: 4, .. }), "{e}");
    }

    #[test]
    fn a_ready_without_its_service_is_refused() {
        let e = error(&format!(
            "{HEAD}1.010 cvm-init: service app ready: /s accepts connections after 3ms\n"
        ));
        assert!(
            matches!(e, TimelineError::ReadyWithoutStart { line: 4, .. }),
            "{e}"
        );
    }

    #[test]
    fn unfinished_and_failed_work_is_drawn_as_such() {
        let log = format!(
            "{HEAD}1.010 cvm-init: phase a start\n1.020 cvm-init: error: phase a failed: x\n\
             1.030 cvm-init: phase b start\n\
             1.040 cvm-init: service s started: pid 3 (/s)\n\
             1.050 cvm-init: error: service s not ready: /s did not accept connections within 9ms\n\
             2.000 console noise\n"
        );
        let t = parse(log.as_bytes()).unwrap();
        assert_eq!(bar(&t, "a").outcome, Outcome::Failed);
        assert_eq!(bar(&t, "b").outcome, Outcome::Unfinished);
        assert!(close(bar(&t, "b").end, 2.0));
        assert_eq!(bar(&t, "s").outcome, Outcome::Failed);
        assert_eq!(bar(&t, "cvm-init").outcome, Outcome::Unfinished);
        assert_eq!(t.ready, None);
        let svg = t.to_svg("x");
        assert!(svg.contains("(failed)") && svg.contains("(unfinished)"));
        assert!(svg.contains("no `cvm-init: ready` line"));
        well_formed(&svg);
    }

    #[test]
    fn a_second_boot_ends_the_picture() {
        let log = format!(
            "{HEAD}1.010 cvm-init: ready\n2.000 cvm-init: starting version 0.1.0\n\
             2.100 cvm-init: phase mounts ok 3ms\n"
        );
        let t = parse(log.as_bytes()).unwrap();
        assert_eq!(t.ready, Some(1.01));
    }

    #[test]
    fn host_text_is_escaped_in_the_svg_and_in_errors() {
        let log = format!(
            "{HEAD}1.010 cvm-init: phase <script>&\"'\u{1b}[2J\u{202e} start\n\
             1.020 cvm-init: service ]]></svg><x a=\"\u{7}\" started: pid 1 (/x)\n\
             1.030 cvm-init: ready\n"
        );
        let svg = parse(log.as_bytes()).unwrap().to_svg("cap<tion>&");
        assert!(!svg.contains("<script>") && !svg.contains("<x ") && !svg.contains("]]>"));
        assert!(!svg.contains('\u{1b}') && !svg.contains('\u{7}') && !svg.contains('\u{202e}'));
        assert!(svg.contains("&lt;script&gt;&amp;&quot;&apos;\u{fffd}[2J\u{fffd}"));
        assert!(svg.contains("cap&lt;tion&gt;&amp;"));
        well_formed(&svg);

        let e = error(&format!(
            "{HEAD}1.010 cvm-init: phase \u{1b}[2J\u{202e} ok 1ms\n"
        ));
        let text = e.to_string();
        assert!(text.contains("\\x1b[2J\\u{202e}"), "{text}");
        assert!(!text.chars().any(|c| c.is_control() || c == '\u{202e}'));
    }

    #[test]
    fn long_names_are_cut_and_our_own_text_is_not() {
        let long = "n".repeat(200);
        let log = format!("{HEAD}1.010 cvm-init: phase {long} start\n1.030 cvm-init: ready\n");
        let svg = parse(log.as_bytes()).unwrap().to_svg("c");
        assert!(svg.contains(&format!(">{}… ", "n".repeat(MAX_NAME))));
        assert!(!svg.contains(&"n".repeat(MAX_NAME + 1)));
        assert!(svg.contains("after QEMU&apos;s start<"));
        well_formed(&svg);
    }

    #[test]
    fn without_kernel_stamps_firmware_and_kernel_are_one_bar() {
        let log = "0.500 BdsDxe: loading Boot0001\n2.000 cvm-init: starting version 0.1.0\n\
                   2.100 cvm-init: ready\n";
        let t = parse(log.as_bytes()).unwrap();
        assert_eq!(t.bars[0].kind, Kind::FirmwareAndKernel);
        assert!(close(t.bars[0].end, 2.0));
        assert!(t.to_svg("x").contains(">firmware and kernel 2.00 s<"));
    }

    #[test]
    fn a_flood_of_phases_is_refused() {
        let mut log = HEAD.to_string();
        for i in 0..MAX_BARS {
            log.push_str(&format!("1.100 cvm-init: phase p{i} start\n"));
        }
        let e = error(&log);
        // Firmware, kernel and cvm-init take three bars: the phase on line 3 + 998 is the last.
        assert_eq!(
            e,
            TimelineError::TooMany {
                line: 3 + MAX_BARS - 2
            }
        );
        // Ended phases count too.
        let mut log = HEAD.to_string();
        for i in 0..MAX_BARS {
            log.push_str(&format!(
                "1.100 cvm-init: phase p{i} start\n1.100 cvm-init: phase p{i} ok 0ms\n"
            ));
        }
        assert!(matches!(error(&log), TimelineError::TooMany { .. }));
    }

    #[test]
    fn tick_steps_keep_the_grid_readable() {
        assert_eq!(tick_step(1.0), 0.1);
        assert_eq!(tick_step(20.0), 1.0);
        assert_eq!(tick_step(125.0), 5.0);
        assert_eq!(tick_step(130.0), 10.0);
        assert!(500_000.0 / tick_step(500_000.0) <= 25.0);
    }

    #[test]
    fn the_real_boots_svg_is_well_formed_with_a_bar_per_phase() {
        let svg = parse(TIMED).unwrap().to_svg("node first boot");
        well_formed(&svg);
        for (name, ms) in PHASES {
            let label = format!(">{name} {}<", human(ms));
            assert!(svg.contains(&label), "{label}");
        }
        assert_eq!(svg.matches("<rect ").count(), 1 + 3 + PHASES.len() + 3);
    }

    /// A structural check of XML (no parser crate in the lock): every tag closed in order,
    /// attributes quoted, `&` only in the entities this module writes, no `<` in text.
    pub(crate) fn well_formed(svg: &str) {
        let body = svg
            .strip_prefix("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n")
            .expect("XML declaration");
        let mut stack: Vec<&str> = Vec::new();
        let mut rest = body;
        let mut roots = 0;
        while !rest.is_empty() {
            match rest.find('<') {
                Some(0) => {
                    let end = rest.find('>').expect("unclosed tag");
                    let tag = &rest[1..end];
                    assert!(!tag.contains('<'), "< inside a tag: {tag}");
                    if let Some(name) = tag.strip_prefix('/') {
                        assert_eq!(stack.pop(), Some(name), "mismatched </{name}>");
                    } else {
                        let self_closing = tag.ends_with('/');
                        let tag = tag.trim_end_matches('/');
                        let (name, attrs) = tag.split_once(' ').unwrap_or((tag, ""));
                        assert!(
                            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()),
                            "tag name {name:?}"
                        );
                        check_attributes(attrs);
                        if stack.is_empty() {
                            roots += 1;
                        }
                        if !self_closing {
                            stack.push(name);
                        }
                    }
                    rest = &rest[end + 1..];
                }
                found => {
                    let text = &rest[..found.unwrap_or(rest.len())];
                    check_text(text);
                    rest = &rest[text.len()..];
                }
            }
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        assert_eq!(roots, 1, "one root element");
    }

    fn check_attributes(mut attrs: &str) {
        loop {
            attrs = attrs.trim_start();
            if attrs.is_empty() {
                return;
            }
            let (name, value) = attrs.split_once("=\"").expect("attribute name=\"value\"");
            assert!(name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':'));
            let end = value.find('"').expect("closing quote");
            check_text(&value[..end]);
            attrs = &value[end + 1..];
        }
    }

    fn check_text(text: &str) {
        assert!(!text.contains('<') && !text.contains('>') || text.trim().is_empty());
        assert!(
            !text
                .chars()
                .any(|c| (c as u32) < 0x20 && c != '\n' && c != '\t' && c != '\r'),
            "a control character in {text:?}"
        );
        for (i, _) in text.match_indices('&') {
            let entity = &text[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| entity.starts_with(e)),
                "a bare & in {text:?}"
            );
        }
    }
}
