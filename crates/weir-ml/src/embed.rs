//! Listing embeddings: standardized numeric features and hashed categorical and title
//! tokens in one fixed-size float32 vector. Deterministic (FNV-1a hashing, no model
//! download) and a pure function of one feature row and the stored standardization, so an
//! incremental refresh embeds exactly as a full rebuild with the same statistics does.

use serde::{Deserialize, Serialize};

/// The numeric inputs, in order: registration year, log(1 + mileage km), power kW. What the
/// vehicle is, not what it is offered for: the price rating compares a listing's price with
/// its neighbours', so the price must not choose the neighbours.
pub const NUMERIC: [&str; N] = ["registration_year", "log_mileage", "power_kw"];
/// How many numeric inputs.
pub const N: usize = 3;

/// The categorical inputs and their weights.
pub const CATEGORICAL: [(&str, f32); 7] = [
    ("country", 2.0),
    ("make", 1.5),
    ("model", 1.5),
    ("segment", 1.0),
    ("fuel", 1.0),
    ("gearbox", 0.5),
    ("seller_kind", 0.5),
];

/// Total weight of a listing's title tokens (spread over its distinct tokens).
const TITLE_WEIGHT: f32 = 1.0;
/// Standardized values are clipped to ±this many standard deviations.
const CLIP: f64 = 4.0;

/// One listing's embedding inputs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs<'a> {
    /// NaN where the value is missing (it embeds as the mean).
    pub numeric: [f64; N],
    /// In [`CATEGORICAL`] order; None where missing.
    pub categorical: [Option<&'a str>; 7],
    pub title: Option<&'a str>,
}

/// Mean and standard deviation of each numeric input, fitted on a full build and kept with
/// the dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardization {
    pub dim: usize,
    pub mean: [f64; N],
    pub std: [f64; N],
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("embedding dimension {0} is not supported: use a multiple of 8 from 16 to 1024")]
pub struct BadDimension(pub usize);

pub fn check_dimension(dim: usize) -> Result<usize, BadDimension> {
    if (16..=1024).contains(&dim) && dim.is_multiple_of(8) { Ok(dim) } else { Err(BadDimension(dim)) }
}

impl Standardization {
    /// Fits mean and (population) standard deviation over the non-missing values.
    pub fn fit<'a>(dim: usize, rows: impl IntoIterator<Item = &'a [f64; N]>) -> Self {
        let (mut n, mut sum, mut sq) = ([0u64; N], [0f64; N], [0f64; N]);
        for r in rows {
            for i in 0..N {
                if r[i].is_finite() {
                    n[i] += 1;
                    sum[i] += r[i];
                    sq[i] += r[i] * r[i];
                }
            }
        }
        let mut mean = [0f64; N];
        let mut std = [1f64; N];
        for i in 0..N {
            if n[i] > 0 {
                mean[i] = sum[i] / n[i] as f64;
                let var = (sq[i] / n[i] as f64 - mean[i] * mean[i]).max(0.0);
                std[i] = if var > 1e-12 { var.sqrt() } else { 1.0 };
            }
        }
        Standardization { dim, mean, std }
    }

    /// The embedding of one listing.
    pub fn embed(&self, x: &Inputs<'_>) -> Vec<f32> {
        let mut v = vec![0f32; self.dim];
        for (i, slot) in v.iter_mut().take(NUMERIC.len()).enumerate() {
            let z = if x.numeric[i].is_finite() { (x.numeric[i] - self.mean[i]) / self.std[i] } else { 0.0 };
            *slot = z.clamp(-CLIP, CLIP) as f32;
        }
        let hashed = self.dim - NUMERIC.len();
        let mut add = |token: &str, weight: f32| {
            let h = fnv1a(token.as_bytes());
            let slot = NUMERIC.len() + (h % hashed as u64) as usize;
            let sign = if (h >> 63) == 0 { 1.0 } else { -1.0 };
            v[slot] += sign * weight;
        };
        for ((name, weight), value) in CATEGORICAL.iter().zip(x.categorical.iter()) {
            if let Some(value) = value {
                add(&format!("{name}={value}"), *weight);
            }
        }
        let tokens = title_tokens(x.title.unwrap_or_default());
        if !tokens.is_empty() {
            let w = TITLE_WEIGHT / (tokens.len() as f32).sqrt();
            for t in &tokens {
                add(&format!("title={t}"), w);
            }
        }
        v
    }
}

/// Lower-case alphanumeric words of a title, distinct, in first-seen order.
pub fn title_tokens(title: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for w in title.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        let w = w.to_lowercase();
        if !out.contains(&w) {
            out.push(w);
        }
    }
    out
}

/// FNV-1a 64: stable across builds and platforms.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Squared Euclidean distance (what the index searches by).
pub fn l2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs<'a>(country: &'a str, title: &'a str, year: f64) -> Inputs<'a> {
        Inputs {
            numeric: [year, 10.0, 100.0],
            categorical: [Some(country), Some("vw"), Some("Golf"), Some("compact"), Some("petrol"), None, None],
            title: Some(title),
        }
    }

    #[test]
    fn standardization_fits_and_clips() {
        let rows = [[1.0, 2.0, f64::NAN], [3.0, 2.0, 4.0]];
        let s = Standardization::fit(16, rows.iter());
        assert_eq!(s.mean, [2.0, 2.0, 4.0]);
        assert_eq!(s.std, [1.0, 1.0, 1.0], "constant columns get std 1, not a division by zero");
        let mut x = inputs("DE", "", 1000.0);
        x.numeric = [3.0, 2.0, f64::NAN];
        let v = s.embed(&x);
        assert_eq!(&v[..N], &[1.0, 0.0, 0.0], "missing values embed as the mean");
        x.numeric[0] = 1e9;
        assert_eq!(s.embed(&x)[0], 4.0, "clipped at 4 standard deviations");
    }

    #[test]
    fn embeddings_are_deterministic_and_similar_listings_are_closer() {
        let s = Standardization { dim: 32, mean: [2015.0, 10.0, 100.0], std: [5.0, 1.0, 30.0] };
        let a = s.embed(&inputs("DE", "VW Golf 1.4 TSI Comfortline", 2015.0));
        assert_eq!(a, s.embed(&inputs("DE", "VW Golf 1.4 TSI Comfortline", 2015.0)));
        assert_eq!(a.len(), 32);
        let near = s.embed(&inputs("DE", "VW Golf 1.4 TSI Highline", 2016.0));
        let far = s.embed(&inputs("FR", "Peugeot 208 diesel", 2008.0));
        assert!(l2(&a, &near) < l2(&a, &far), "{} vs {}", l2(&a, &near), l2(&a, &far));
    }

    #[test]
    fn dimensions_and_tokens() {
        assert_eq!(check_dimension(32), Ok(32));
        assert_eq!(check_dimension(12), Err(BadDimension(12)));
        assert_eq!(check_dimension(33), Err(BadDimension(33)));
        assert_eq!(title_tokens("VW Golf, golf 1.4-TSI"), ["vw", "golf", "1", "4", "tsi"]);
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
    }
}
