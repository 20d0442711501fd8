//! Progress across a process boundary: the background proxy process writes one JSON line
//! per [`Report`] on its stdout; the process that started it reads them back, typed, until
//! `Ready` or `Failed`. Nothing is printed for people here: the reader renders the events.

use std::io::Write;

use pgharness::events::Event;
use serde::{Deserialize, Serialize};

/// One line of the background process's report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Report {
    /// Progress.
    Event(Event),
    /// It serves clients at this URL (password redacted).
    Ready {
        /// The redacted URL.
        url: String,
    },
    /// It could not start: the error with its causes.
    Failed {
        /// What went wrong, and how to fix it.
        error: String,
    },
}

impl Report {
    /// Writes this report as one line to `out` and flushes it.
    pub fn write_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        let line = serde_json::to_string(self).map_err(std::io::Error::other)?;
        writeln!(out, "{line}")?;
        out.flush()
    }

    /// Reads one line back; `None` for a line that is not a report.
    pub fn parse(line: &str) -> Option<Report> {
        serde_json::from_str(line).ok()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn reports_survive_the_pipe() {
        let reports = [
            Report::Event(Event::WaitingForDatabase {
                waited: Duration::from_millis(1500),
                reason: "FATAL 57P03: the database system is starting up".into(),
            }),
            Report::Ready {
                url: "postgres://iam_app:***@127.0.0.1:5433/postgres".into(),
            },
            Report::Failed {
                error: "failed to open the SSM tunnel: …".into(),
            },
        ];
        let mut pipe = Vec::new();
        for report in &reports {
            report.write_to(&mut pipe).unwrap();
        }
        let text = String::from_utf8(pipe).unwrap();
        let back: Vec<Report> = text.lines().filter_map(Report::parse).collect();
        assert_eq!(back, reports);
        assert_eq!(Report::parse("xtask: something else"), None);
    }
}
