//! Allowed windows of a rollout (`rollout start --window 02:00-05:00
//! --window-tz Europe/Berlin --window-days mon-fri`): local times of day, on
//! some weekdays, in one IANA time zone. A rollout starts no new step outside
//! them: one whose window closes mid-rollout waits (like a pause, nothing
//! fails) and goes on in the next window. Pure: the time is an argument.
//!
//! A window that ends before it starts crosses midnight (22:00-02:00); its
//! day is the day it opens. Daylight-saving gaps and folds resolve as the
//! clock on the wall does (a 02:30 that does not exist opens at 03:30).

use jiff::{civil, tz::TimeZone, Timestamp, Zoned};
use serde::{Deserialize, Serialize};

/// Days of the week, Monday first (bit 0) to Sunday (bit 6).
const EVERY_DAY: u8 = 0x7f;
const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
/// Windows one spec may name.
pub const MAX_WINDOWS: usize = 16;

/// A window's text or time zone that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("invalid window {text}: {reason} (use HH:MM-HH:MM, optionally seconds, e.g. 02:00-05:00, and days like mon-fri)")]
    Syntax { text: String, reason: String },
    #[error("window {0} never opens: it starts and ends at the same time")]
    Empty(String),
    #[error("unknown time zone {0}: give an IANA name like Europe/Berlin or UTC (--window-tz)")]
    TimeZone(String),
    #[error("{0} windows given; at most 16")]
    TooMany(usize),
}

/// One daily window: seconds after local midnight, and the days it opens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub start_s: u32,
    pub end_s: u32,
    /// Bit 0 Monday … bit 6 Sunday.
    pub days: u8,
}

/// Every window of a rollout, in one time zone; none: always open.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Windows {
    pub tz: String,
    pub windows: Vec<Window>,
}

/// Whether a rollout may start a step now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowState {
    Open,
    /// Closed; the next window opens then (Unix ms).
    Closed {
        next_open_ms: u64,
    },
}

fn syntax(text: &str, reason: impl Into<String>) -> WindowError {
    WindowError::Syntax { text: crate::input::excerpt(text), reason: reason.into() }
}

fn time_of_day(text: &str, whole: &str) -> Result<u32, WindowError> {
    let parts: Vec<&str> = text.split(':').collect();
    let num = |s: &str, max: u32| s.parse::<u32>().ok().filter(|n| *n <= max && s.len() == 2);
    let (h, m, s) = match parts.as_slice() {
        [h, m] => (num(h, 23), num(m, 59), Some(0)),
        [h, m, s] => (num(h, 23), num(m, 59), num(s, 59)),
        _ => (None, None, None),
    };
    match (h, m, s) {
        (Some(h), Some(m), Some(s)) => Ok(h * 3600 + m * 60 + s),
        _ => Err(syntax(whole, format!("{text:?} is not a time of day HH:MM[:SS]"))),
    }
}

/// `mon-fri`, `sat,sun`, `mon,wed-fri`; empty = every day.
pub fn parse_days(text: &str) -> Result<u8, WindowError> {
    if text.trim().is_empty() {
        return Ok(EVERY_DAY);
    }
    let day = |name: &str| {
        DAY_NAMES
            .iter()
            .position(|d| name.trim().to_ascii_lowercase().starts_with(d))
            .ok_or_else(|| syntax(text, format!("{name:?} is not a day (mon … sun)")))
    };
    let mut days = 0u8;
    for part in text.split(',') {
        let (from, to) = match part.split_once('-') {
            Some((a, b)) => (day(a)?, day(b)?),
            None => (day(part)?, day(part)?),
        };
        let mut d = from;
        loop {
            days |= 1 << d;
            if d == to {
                break;
            }
            d = (d + 1) % 7;
        }
    }
    Ok(days)
}

impl Window {
    /// `HH:MM-HH:MM` (seconds optional), then optionally days after a space:
    /// `02:00-05:00 mon-fri`.
    pub fn parse(text: &str) -> Result<Self, WindowError> {
        crate::input::text("window", text, 64).map_err(|e| syntax(text, e.to_string()))?;
        let (times, days) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
        let (start, end) = times.split_once('-').ok_or_else(|| syntax(text, "no '-' between start and end"))?;
        let window =
            Window { start_s: time_of_day(start, text)?, end_s: time_of_day(end, text)?, days: parse_days(days)? };
        if window.start_s == window.end_s {
            return Err(WindowError::Empty(crate::input::excerpt(text)));
        }
        Ok(window)
    }

    /// Its opening and closing instants when it opens on `date`, if it does.
    fn on(&self, date: civil::Date, tz: &TimeZone) -> Option<(Timestamp, Timestamp)> {
        let weekday = date.weekday().to_monday_zero_offset();
        if self.days & (1 << weekday) == 0 {
            return None;
        }
        let at = |date: civil::Date, s: u32| -> Option<Timestamp> {
            let time = civil::Time::new((s / 3600) as i8, (s / 60 % 60) as i8, (s % 60) as i8, 0).ok()?;
            tz.to_ambiguous_zoned(date.to_datetime(time)).compatible().ok().map(|z| z.timestamp())
        };
        let end_date = if self.end_s > self.start_s { date } else { date.tomorrow().ok()? };
        Some((at(date, self.start_s)?, at(end_date, self.end_s)?))
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hms = |s: u32| match s % 60 {
            0 => format!("{:02}:{:02}", s / 3600, s / 60 % 60),
            sec => format!("{:02}:{:02}:{sec:02}", s / 3600, s / 60 % 60),
        };
        write!(f, "{}-{}", hms(self.start_s), hms(self.end_s))?;
        if self.days != EVERY_DAY {
            let names: Vec<&str> = (0..7).filter(|d| self.days & (1 << d) != 0).map(|d| DAY_NAMES[d]).collect();
            write!(f, " {}", names.join(","))?;
        }
        Ok(())
    }
}

impl Windows {
    /// Parses the operator's windows; `tz` empty means UTC.
    pub fn parse(windows: &[String], tz: &str) -> Result<Self, WindowError> {
        if windows.len() > MAX_WINDOWS {
            return Err(WindowError::TooMany(windows.len()));
        }
        if windows.is_empty() && tz.trim().is_empty() {
            return Ok(Self::default());
        }
        let tz = if tz.trim().is_empty() { "UTC".to_string() } else { tz.trim().to_string() };
        let windows = windows.iter().map(|w| Window::parse(w)).collect::<Result<Vec<_>, _>>()?;
        let parsed = Self { tz, windows };
        parsed.zone()?;
        Ok(parsed)
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    fn zone(&self) -> Result<TimeZone, WindowError> {
        jiff::tz::db().get(&self.tz).map_err(|_| WindowError::TimeZone(crate::input::excerpt(&self.tz)))
    }

    /// Open now, or when the next window opens (none at all: always open).
    pub fn state(&self, now_ms: u64) -> WindowState {
        let (Ok(tz), Ok(now)) = (self.zone(), Timestamp::from_millisecond(now_ms as i64)) else {
            return WindowState::Open;
        };
        if self.windows.is_empty() {
            return WindowState::Open;
        }
        let today = Zoned::new(now, tz.clone()).date();
        let mut next: Option<Timestamp> = None;
        // Yesterday's window may still be open (past midnight); a week ahead covers every weekday.
        for offset in -1..=7i64 {
            let Ok(date) = today.checked_add(jiff::Span::new().days(offset)) else { continue };
            for (start, end) in self.windows.iter().filter_map(|w| w.on(date, &tz)) {
                if start <= now && now < end {
                    return WindowState::Open;
                }
                if start > now && next.is_none_or(|n| start < n) {
                    next = Some(start);
                }
            }
        }
        match next {
            Some(at) => WindowState::Closed { next_open_ms: at.as_millisecond().max(0) as u64 },
            None => WindowState::Open,
        }
    }
}

impl std::fmt::Display for Windows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list: Vec<String> = self.windows.iter().map(Window::to_string).collect();
        write!(f, "{} {}", list.join(" | "), self.tz)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> u64 {
        rfc3339.parse::<Timestamp>().expect("time").as_millisecond() as u64
    }

    fn berlin(windows: &[&str]) -> Windows {
        Windows::parse(&windows.iter().map(|w| w.to_string()).collect::<Vec<_>>(), "Europe/Berlin").expect("parse")
    }

    #[test]
    fn windows_parse_with_days_and_seconds_and_refuse_what_never_opens() {
        let w = Window::parse("02:00-05:00 mon-fri").expect("parse");
        assert_eq!((w.start_s, w.end_s, w.days), (7200, 18000, 0b001_1111));
        assert_eq!(w.to_string(), "02:00-05:00 mon,tue,wed,thu,fri");
        assert_eq!(Window::parse("22:00:30-02:00 sat-mon").expect("wraps").days, 0b110_0001);
        assert_eq!(Window::parse("22:00:30-02:00").expect("seconds").to_string(), "22:00:30-02:00");
        for bad in ["02:00", "2:00-05:00", "25:00-26:00", "02:00-05:00 someday", "02:00-05:00 mon-"] {
            assert!(matches!(Window::parse(bad), Err(WindowError::Syntax { .. })), "{bad}");
        }
        assert!(matches!(Window::parse("03:00-03:00"), Err(WindowError::Empty(_))), "never opens");
        let err = Windows::parse(&["02:00-05:00".into()], "Mars/Olympus").expect_err("tz");
        assert!(err.to_string().contains("unknown time zone \"Mars/Olympus\""), "{err}");
        assert_eq!(Windows::parse(&["02:00-05:00".into()], "").expect("utc").tz, "UTC");
    }

    #[test]
    fn a_window_is_open_in_its_local_hours_on_its_days_and_says_when_it_opens_next() {
        let w = berlin(&["02:00-05:00 mon-fri"]);
        // Thursday 2026-12-24 03:00 in Berlin is 02:00 UTC (winter, UTC+1).
        assert_eq!(w.state(ms("2026-12-24T02:00:00Z")), WindowState::Open);
        assert_eq!(w.state(ms("2026-12-24T03:59:59Z")), WindowState::Open);
        assert_eq!(
            w.state(ms("2026-12-24T04:00:00Z")),
            WindowState::Closed { next_open_ms: ms("2026-12-25T01:00:00Z") },
            "closed at 05:00 local; Friday's opens at 02:00 local"
        );
        // Friday after hours: the next is Monday's.
        assert_eq!(
            w.state(ms("2026-12-25T12:00:00Z")),
            WindowState::Closed { next_open_ms: ms("2026-12-28T01:00:00Z") }
        );
        // Summer time: 02:00 Berlin is 00:00 UTC.
        assert_eq!(w.state(ms("2026-07-01T00:30:00Z")), WindowState::Open);
        // Across midnight, on the day it opens.
        let night = berlin(&["23:00-01:00 sat"]);
        assert_eq!(night.state(ms("2026-12-26T23:30:00Z")), WindowState::Open, "Sun 00:30 local, Saturday's window");
        assert!(matches!(night.state(ms("2026-12-27T23:30:00Z")), WindowState::Closed { .. }), "Mon 00:30 local");
        assert_eq!(Windows::default().state(0), WindowState::Open, "no window: always open");
    }
}
