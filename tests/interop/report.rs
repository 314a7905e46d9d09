//! What the cases measured, and the corrupted-block difference side by
//! side.

use std::fmt::Write as _;

use crate::cases::Case;

/// The outcome of the corruption experiment, per receiver.
#[derive(Debug, Default)]
pub struct Outcome {
    pub control_delivered: bool,
    pub corrupt_delivered: bool,
    pub detail: String,
}

/// One row of the difference table.
#[derive(Debug)]
pub struct Row {
    pub who: &'static str,
    /// "UDP" (measured at the application) or "TCP" (measured at the
    /// receiving TCP stack).
    pub proto: &'static str,
    /// Whether the corrupted packet is expected to get through.
    pub corrupt_expected: bool,
    pub outcome: Outcome,
}

/// What one case measured, for the summary.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<String>,
    pub rows: Vec<Row>,
}

/// The difference, side by side: the table to print, and a line for every
/// row whose outcome is not the expected one.
pub fn difference_table(outcomes: &[(Case, Report)]) -> (String, Vec<String>) {
    let mut table = String::from(
        "\ncorrupted block (valid ICV, wrong inner checksum) vs. a valid control packet\n\
         (UDP: what the application received; TCP: what the receiving TCP stack did with a\n\
         segment to a closed port, from its counters; an accepted one is answered with a reset):\n",
    );
    let mut failures = Vec::new();
    for (case, report) in outcomes {
        for row in &report.rows {
            let o = &row.outcome;
            let (ok, not, through) = if row.proto == "TCP" {
                (
                    "accepted",
                    "NOT accepted",
                    "ACCEPTED by TCP (no checksum error)",
                )
            } else {
                ("delivered", "NOT delivered", "DELIVERED to the application")
            };
            let _ = writeln!(
                table,
                "  {:<31} {} -> {:<12}: control {}, corrupted {} ({})",
                case.name(),
                row.proto,
                row.who,
                if o.control_delivered { ok } else { not },
                if o.corrupt_delivered {
                    through
                } else {
                    "dropped"
                },
                o.detail
            );
            if !o.control_delivered || o.corrupt_delivered != row.corrupt_expected {
                failures.push(format!(
                    "{} {} -> {}: {o:?}",
                    case.name(),
                    row.proto,
                    row.who
                ));
            }
        }
    }
    (table, failures)
}
