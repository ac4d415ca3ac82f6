//! Sets of integer keys, and maps from them, for lookups made once per row of a table's key
//! column: a merge tests every key of the files it reads (a million rows and more) against
//! the keys of a batch (a hundred thousand). The keys of a table are mostly dense (serial
//! ids), so a bitmap over their range answers a lookup with one bit test, in a few hundred
//! kilobytes that stay in cache; sparse keys fall back to a hash table with a multiplicative
//! hash (std's SipHash costs more than the rest of the lookup).

use rustc_hash::{FxHashMap, FxHashSet};

/// Bits per key at most for a bitmap: beyond, the keys are too sparse for one.
const BITS_PER_KEY: u64 = 64;
/// A bitmap of this many bits (8 KiB) is always cheap enough.
const MIN_BITMAP_BITS: u64 = 1 << 16;

/// The keys as bits over `[min, min + bits)`.
#[derive(Debug, Clone)]
struct Bitmap {
    min: i64,
    bits: u64,
    words: Vec<u64>,
}

impl Bitmap {
    /// A bitmap of `keys`, if they are dense enough for one.
    fn of(keys: &[i64]) -> Option<Self> {
        let (min, max) = (*keys.iter().min()?, *keys.iter().max()?);
        let range = (max as i128 - min as i128 + 1) as u128;
        let limit = (keys.len() as u64).saturating_mul(BITS_PER_KEY).max(MIN_BITMAP_BITS);
        if range > limit as u128 {
            return None;
        }
        let bits = range as u64;
        let mut words = vec![0u64; bits.div_ceil(64) as usize];
        for &k in keys {
            let d = k.wrapping_sub(min) as u64;
            words[(d >> 6) as usize] |= 1 << (d & 63);
        }
        Some(Bitmap { min, bits, words })
    }

    fn contains(&self, k: i64) -> bool {
        // A key below `min` wraps to an offset at or past `bits` (`min + bits - 1`, the
        // largest key, is an i64).
        let d = k.wrapping_sub(self.min) as u64;
        d < self.bits && self.words[(d >> 6) as usize] & (1 << (d & 63)) != 0
    }
}

/// A set of `i64` keys.
#[derive(Debug, Clone, Default)]
pub struct IntSet {
    bitmap: Option<Bitmap>,
    /// The keys, when they are too sparse for a bitmap.
    sparse: FxHashSet<i64>,
    len: usize,
}

impl IntSet {
    pub fn new(keys: impl IntoIterator<Item = i64>) -> Self {
        let mut keys: Vec<i64> = keys.into_iter().collect();
        keys.sort_unstable();
        keys.dedup();
        let len = keys.len();
        match Bitmap::of(&keys) {
            Some(bitmap) => IntSet { bitmap: Some(bitmap), sparse: FxHashSet::default(), len },
            None => IntSet { bitmap: None, sparse: keys.into_iter().collect(), len },
        }
    }

    pub fn contains(&self, k: i64) -> bool {
        match &self.bitmap {
            Some(b) => b.contains(k),
            None => self.sparse.contains(&k),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl FromIterator<i64> for IntSet {
    fn from_iter<T: IntoIterator<Item = i64>>(iter: T) -> Self {
        IntSet::new(iter)
    }
}

/// A map from `i64` keys: a bitmap of the keys (when dense) answers the misses, a hash table
/// the hits.
#[derive(Debug, Clone)]
pub struct IntMap<V> {
    bitmap: Option<Bitmap>,
    map: FxHashMap<i64, V>,
}

impl<V> IntMap<V> {
    /// The map of `entries`; a key given twice keeps its last value.
    pub fn new(entries: impl IntoIterator<Item = (i64, V)>) -> Self {
        let map: FxHashMap<i64, V> = entries.into_iter().collect();
        let keys: Vec<i64> = map.keys().copied().collect();
        IntMap { bitmap: Bitmap::of(&keys), map }
    }

    pub fn get(&self, k: i64) -> Option<&V> {
        if self.bitmap.as_ref().is_some_and(|b| !b.contains(k)) {
            return None;
        }
        self.map.get(&k)
    }

    pub fn keys(&self) -> impl Iterator<Item = i64> + '_ {
        self.map.keys().copied()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    /// A small deterministic generator (xorshift): no dependency for test data.
    fn numbers(seed: u64, n: usize, spread: i64) -> Vec<i64> {
        let mut x = seed.max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % spread as u64) as i64 - spread / 3
            })
            .collect()
    }

    fn agrees_with_std(keys: &[i64], probes: &[i64]) {
        let set = IntSet::new(keys.iter().copied());
        let reference: HashSet<i64> = keys.iter().copied().collect();
        assert_eq!(set.len(), reference.len());
        for &p in probes.iter().chain(keys) {
            assert_eq!(set.contains(p), reference.contains(&p), "key {p}");
        }
        let map = IntMap::new(keys.iter().enumerate().map(|(i, &k)| (k, i)));
        let reference: HashMap<i64, usize> = keys.iter().enumerate().map(|(i, &k)| (k, i)).collect();
        assert_eq!(map.len(), reference.len());
        for &p in probes.iter().chain(keys) {
            assert_eq!(map.get(p), reference.get(&p), "key {p}");
        }
    }

    #[test]
    fn dense_keys_use_a_bitmap_and_answer_like_a_hash_set() {
        let keys = numbers(7, 5_000, 20_000);
        assert!(IntSet::new(keys.iter().copied()).bitmap.is_some());
        agrees_with_std(&keys, &numbers(11, 20_000, 30_000));
    }

    #[test]
    fn sparse_keys_use_a_hash_set_and_answer_the_same() {
        let keys = numbers(3, 1_000, i64::MAX / 2);
        assert!(IntSet::new(keys.iter().copied()).bitmap.is_none());
        agrees_with_std(&keys, &numbers(5, 5_000, i64::MAX / 2));
    }

    #[test]
    fn the_extremes_of_i64_and_the_edges_of_the_range() {
        agrees_with_std(&[i64::MIN, i64::MAX, 0], &[i64::MIN + 1, i64::MAX - 1, -1, 1]);
        let keys = [100, 101, 163, 164, 165];
        agrees_with_std(&keys, &[99, 102, 162, 166, 100 + 64, 100 + 65, i64::MIN, i64::MAX]);
        let one = IntSet::new([i64::MAX]);
        assert!(one.contains(i64::MAX) && !one.contains(i64::MIN) && !one.contains(i64::MAX - 1));
    }

    #[test]
    fn empty_sets_hold_nothing() {
        let set = IntSet::new([]);
        assert!(set.is_empty() && !set.contains(0) && !set.contains(i64::MIN));
        let map: IntMap<u32> = IntMap::new([]);
        assert!(map.is_empty() && map.get(0).is_none());
    }

    #[test]
    fn a_map_keeps_the_last_value_of_a_repeated_key() {
        let map = IntMap::new([(5, 'a'), (6, 'b'), (5, 'c')]);
        assert_eq!((map.get(5), map.get(6), map.len()), (Some(&'c'), Some(&'b'), 2));
    }
}
