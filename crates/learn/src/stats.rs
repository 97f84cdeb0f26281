//! The small statistics the fits use: medians, trimmed means, pooled variances.

/// The median of `v` (sorted in place); 0 for none.
pub(crate) fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The variance within groups, over all `groups` (each group's squares about its own
/// mean, over the degrees of freedom of all): what one value varies by, whichever
/// group it is in.
pub(crate) fn pooled_variance<'a>(groups: impl Iterator<Item = &'a Vec<f64>>) -> f64 {
    let (mut squares, mut freedom) = (0.0, 0usize);
    for g in groups.filter(|g| g.len() >= 2) {
        squares += variance(g) * (g.len() - 1) as f64;
        freedom += g.len() - 1;
    }
    if freedom == 0 {
        0.0
    } else {
        squares / freedom as f64
    }
}

/// The sample variance of `v` (0 for fewer than two).
fn variance(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64
}

/// The mean of `v` without its lowest and highest fifth (sorted in place).
pub(crate) fn trimmed_mean(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let cut = v.len() / 5;
    let kept = &v[cut..v.len() - cut];
    if kept.is_empty() {
        0.0
    } else {
        kept.iter().sum::<f64>() / kept.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_means_and_spreads() {
        assert_eq!(median(&mut []), 0.0);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        // The lowest and highest fifth left out.
        assert_eq!(trimmed_mean(&mut [100.0, 1.0, 2.0, 3.0, -50.0]), 2.0);
        assert_eq!(variance(&[1.0]), 0.0);
        assert_eq!(variance(&[1.0, 3.0]), 2.0);
        // Each group about its own mean: two groups of spread 2, one too small to say.
        let groups = [vec![1.0, 3.0], vec![11.0, 13.0], vec![100.0]];
        assert_eq!(pooled_variance(groups.iter()), 2.0);
    }
}
