//! Progress bars (indicatif) for long steps; plain lines when stderr is not a terminal.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

#[derive(Default)]
pub struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    pub fn new() -> Self {
        Self::default()
    }
}

impl weir_synth::Progress for Bars {
    fn start(&self, table: &str, expected_rows: u64) {
        let bar = self.multi.add(ProgressBar::new(expected_rows));
        bar.set_style(
            ProgressStyle::with_template(
                "  {prefix:<10} {bar:30} {human_pos:>11}/{human_len:<11} rows  {per_sec:>14}  {elapsed_precise}",
            )
            .expect("valid template"),
        );
        bar.set_prefix(table.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        self.bars.lock().unwrap_or_else(|p| p.into_inner()).insert(table.to_string(), bar);
    }

    fn advance(&self, table: &str, rows: u64) {
        if let Some(b) = self.bars.lock().unwrap_or_else(|p| p.into_inner()).get(table) {
            b.inc(rows);
        }
    }

    fn finish(&self, table: &str, rows: u64) {
        if let Some(b) = self.bars.lock().unwrap_or_else(|p| p.into_inner()).remove(table) {
            b.set_length(rows);
            b.set_position(rows);
            b.finish_and_clear();
        }
    }
}
