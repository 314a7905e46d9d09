use super::measure::share;
use super::*;

#[test]
fn the_sizes_default_shown_is_the_library_default() {
    let parsed: Vec<usize> = DEFAULT_SIZES_ARG
        .split(',')
        .map(|s| parse_size(s).expect("a size"))
        .collect();
    assert_eq!(parsed, bench::DEFAULT_SIZES);
}

#[test]
fn a_share_above_100_percent_is_marked_as_noise() {
    let mut noise = false;
    assert_eq!(share(0.87, &mut noise), "87% ");
    assert_eq!(share(1.004, &mut noise), "100% ");
    assert!(!noise);
    assert_eq!(share(1.02, &mut noise), "102%*");
    assert!(noise);
}
