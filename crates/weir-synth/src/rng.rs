//! A small, fixed pseudo-random generator (SplitMix64), so that "same seed, same bytes"
//! holds across platforms and dependency upgrades.

#[derive(Debug, Clone)]
pub struct Rng(u64);

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(mix(seed ^ 0x5eed_5eed_5eed_5eed))
    }

    /// An independent stream for (seed, stream, index): one per listing, per currency, per day.
    pub fn derive(seed: u64, stream: u64, index: u64) -> Self {
        Self::new(mix(mix(seed).wrapping_add(stream.wrapping_mul(0x9e37_79b9_7f4a_7c15))) ^ mix(index))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// An index drawn with the given weights (not all zero).
    pub fn weighted(&mut self, weights: &[u32]) -> usize {
        let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        let mut x = self.below(total);
        for (i, w) in weights.iter().enumerate() {
            let w = u64::from(*w);
            if x < w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_bounded() {
        let a: Vec<u64> = (0..5).map(|_| Rng::derive(7, 1, 2).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(Rng::derive(7, 1, 2).next_u64(), Rng::derive(7, 1, 3).next_u64());
        assert_ne!(Rng::derive(7, 1, 2).next_u64(), Rng::derive(8, 1, 2).next_u64());
        let mut r = Rng::new(1);
        let mut seen = [0u32; 3];
        for _ in 0..3000 {
            let v = r.range(5, 7);
            assert!((5..=7).contains(&v));
            seen[(v - 5) as usize] += 1;
            assert!(r.unit() < 1.0);
        }
        assert!(seen.iter().all(|c| *c > 800), "{seen:?}");
        let mut hits = [0u32; 2];
        for _ in 0..1000 {
            hits[r.weighted(&[1, 3])] += 1;
        }
        assert!(hits[1] > 2 * hits[0], "{hits:?}");
    }
}
