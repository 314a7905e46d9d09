//! `esptun selftest` and `esptun bench`: running the measurements and
//! printing their tables.

use std::process::ExitCode;

use anyhow::{Context, bail};

use esptun::crypto::select::{BootOptions, FailurePolicy, Mode, ProviderReport, Selector};
use esptun::crypto::{Provider, ProviderId};
use esptun::tools::bench::{self, BenchConfig, Op};

pub(super) fn selftest(json: bool, mode: Mode) -> anyhow::Result<ExitCode> {
    let selector = Selector::boot(
        Provider::detect_all(),
        mode,
        FailurePolicy::Fallback,
        BootOptions::default(),
    );
    let reports = selector.reports();
    let selected = selector.active();
    if json {
        let out = serde_json::json!({
            "mode": mode,
            "selected": selected,
            "providers": reports,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).context("serializing the report")?
        );
    } else {
        print_selftest_table(&reports, mode, selected);
    }
    Ok(match selected {
        Some(_) => ExitCode::SUCCESS,
        None => {
            eprintln!(
                "esptun: no AES-GCM provider passed its self-tests for --crypto {mode}; \
                 refusing to carry traffic (see the reasons above; try --crypto auto)"
            );
            ExitCode::from(super::EXIT_SELFTEST_FAILED)
        }
    })
}

fn print_selftest_table(reports: &[ProviderReport], mode: Mode, selected: Option<ProviderId>) {
    println!(
        "{:<9} {:<17} {:<9} {:<10} {:>11} {:<6}",
        "provider", "implementation", "kind", "available", "vectors", "simd"
    );
    for r in reports {
        let kind = if r.hardware { "hardware" } else { "software" };
        let vectors = if r.available {
            format!("{}/{}", r.kat_passed, r.kat_passed + r.kat_failed)
        } else {
            "-".into()
        };
        let simd = match r.simd_ok {
            Some(true) => "ok",
            Some(false) => "FAILED",
            None => "-",
        };
        println!(
            "{:<9} {:<17} {:<9} {:<10} {:>11} {:<6}",
            r.name.as_str(),
            r.implementation,
            kind,
            if r.available { "yes" } else { "no" },
            vectors,
            simd
        );
    }
    for r in reports {
        if let Some(why) = &r.unavailable_reason {
            println!("  {}: unavailable: {why}", r.name);
        }
        for failure in &r.kat_failures {
            println!("  {}: vector failed: {failure}", r.name);
        }
        if let Some(check) = &r.register_check {
            println!("  {}: register check: {}", r.name, check.summary());
        }
        if let Some(detail) = &r.long_message_detail {
            println!("  {}: long-message check: {detail}", r.name);
        }
        if let Some(why) = &r.disabled {
            println!("  {}: DISABLED: {why}", r.name);
        }
    }
    match selected {
        Some(id) => println!("selected ({mode}): {id}"),
        None => println!("selected ({mode}): none"),
    }
}

pub(super) fn run_bench(json: bool, config: &BenchConfig) -> anyhow::Result<()> {
    let providers = Provider::detect_all();
    for p in &providers {
        if let Err(why) = &p.availability {
            eprintln!("esptun: not benchmarking {}: {why}", p.id);
        }
    }
    if providers.iter().all(|p| !p.is_available()) {
        bail!("no provider is available to benchmark");
    }
    let results = bench::run(&providers, config).map_err(anyhow::Error::msg)?;
    let checksums = bench::run_checksum(config).map_err(anyhow::Error::msg)?;
    let datapath = bench::esp::run(config).map_err(anyhow::Error::msg)?;
    if json {
        let datapath: Vec<_> = datapath
            .iter()
            .flat_map(bench::esp::DatapathRow::results)
            .collect();
        for r in results.iter().chain(&checksums).chain(&datapath) {
            println!(
                "{}",
                serde_json::to_string(r).context("serializing a result")?
            );
        }
        return Ok(());
    }
    let names: Vec<String> = {
        let mut seen: Vec<String> = Vec::new();
        for r in &results {
            if !seen.contains(&r.provider) {
                seen.push(r.provider.clone());
            }
        }
        seen
    };
    let implementation = |name: &str| {
        providers
            .iter()
            .find(|p| p.id.as_str() == name)
            .map_or(String::new(), |p| format!(" ({})", p.name))
    };
    println!(
        "AES-{}-GCM, 16-byte ICV, MB/s = 10^6 bytes/s, fastest 25 ms slice of {} x {} s per cell",
        config.key_size.bits(),
        config.rounds,
        config.seconds
    );
    print!("{:>7} {:<5}", "size", "op");
    for n in &names {
        print!(" {:>26}", format!("{n}{}", implementation(n)));
    }
    print!(" {:>9}", "hw/soft");
    if config.baseline {
        print!(" {:>12} {:>14}", "hw/ring", "soft/rcrypto");
    }
    println!();
    for &size in &config.sizes {
        for op in [Op::Seal, Op::Open] {
            print!("{size:>7} {:<5}", op.as_str());
            for n in &names {
                let v = results
                    .iter()
                    .find(|r| &r.provider == n && r.op == op && r.size == size)
                    .map_or(0.0, |r| r.mb_per_s);
                print!(" {v:>26.1}");
            }
            let show = |x: Option<f64>, width: usize| match x {
                Some(x) => format!("{:>width$}", format!("{x:.2}x")),
                None => format!("{:>width$}", "-"),
            };
            print!(
                " {}",
                show(bench::ratio(&results, "hardware", "soft", op, size), 9)
            );
            if config.baseline {
                print!(
                    " {} {}",
                    show(
                        bench::ratio(&results, "hardware", "ring-direct", op, size),
                        12
                    ),
                    show(
                        bench::ratio(&results, "soft", "rustcrypto-direct", op, size),
                        14
                    )
                );
            }
            println!();
        }
    }
    print_datapath_table(&datapath);
    println!("\ninner checksum (RFC 1071 sum, wire::checksum), GB/s:");
    for r in &checksums {
        println!("{:>7} {:>8.1}", r.size, r.mb_per_s / 1000.0);
    }
    Ok(())
}

/// Whole packets through the pipelines, as MB/s of inner packet bytes and
/// as a share of raw seal/open measured alongside.
fn print_datapath_table(rows: &[bench::esp::DatapathRow]) {
    if rows.is_empty() {
        return;
    }
    println!(
        "\ndatapath, IPv4/UDP packets of SIZE bytes, inner checksum validated both ways; \
         share = of raw seal/open with the same key, measured in the same slices:"
    );
    println!(
        "{:>7} {:<9} {:>10} {:>8} {:>10} {:>8}",
        "size", "provider", "outbound", "share ", "inbound", "share "
    );
    let mut noise = false;
    for r in rows {
        let (out, inb) = r.shares();
        let (out, inb) = (share(out, &mut noise), share(inb, &mut noise));
        println!(
            "{:>7} {:<9} {:>10.1} {out:>8} {:>10.1} {inb:>8}",
            r.size,
            r.provider.as_str(),
            r.outbound_mb_per_s,
            r.inbound_mb_per_s,
        );
    }
    if noise {
        println!(
            "  * above 100%: noise, within measurement error. A pipeline does the raw \
             seal/open plus more work, so it cannot really be faster; read these as 100%."
        );
    }
}

/// A datapath share as a percentage; above 100% is noise (the pipeline
/// includes the raw operation), marked with `*` and footnoted.
pub(super) fn share(fraction: f64, noise: &mut bool) -> String {
    let percent = 100.0 * fraction;
    if percent.round() > 100.0 {
        *noise = true;
        format!("{percent:.0}%*")
    } else {
        format!("{percent:.0}% ")
    }
}
