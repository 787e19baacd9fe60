//! Python's `random.Random`: the Mersenne Twister (MT19937) seeded from an integer as
//! CPython seeds it, with `random.sample` drawn the same way. lm-evaluation-harness picks
//! the few-shot examples of tasks without a fixed order (GSM8K) with
//! `Random(1234).sample(pool, n)`, one call per test document in order, so the same
//! examples are only chosen by the same generator.

/// CPython's `random.Random(seed)` for a non-negative integer seed.
pub struct PyRandom {
    state: [u32; 624],
    index: usize,
}

const N: usize = 624;
const M: usize = 397;

impl PyRandom {
    /// The generator `random.Random(seed)` builds (`init_by_array` over the seed's 32-bit
    /// words, least significant first).
    pub fn new(seed: u64) -> Self {
        let key: Vec<u32> = if seed >> 32 == 0 {
            vec![seed as u32]
        } else {
            vec![seed as u32, (seed >> 32) as u32]
        };
        let mut rng = PyRandom {
            state: [0; N],
            index: N,
        };
        rng.init_genrand(19_650_218);
        let mt = &mut rng.state;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            let prev = mt[i - 1] ^ (mt[i - 1] >> 30);
            mt[i] = (mt[i] ^ prev.wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = mt[i - 1] ^ (mt[i - 1] >> 30);
            mt[i] = (mt[i] ^ prev.wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        rng
    }

    fn init_genrand(&mut self, seed: u32) {
        self.state[0] = seed;
        for i in 1..N {
            let prev = self.state[i - 1];
            self.state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        self.index = N;
    }

    /// The next 32 random bits (`genrand_uint32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            for k in 0..N {
                let y = (self.state[k] & 0x8000_0000) | (self.state[(k + 1) % N] & 0x7fff_ffff);
                let mag = if y & 1 == 0 { 0 } else { 0x9908_b0df };
                self.state[k] = self.state[(k + M) % N] ^ (y >> 1) ^ mag;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `_randbelow(n)`: a uniform integer in `0..n` by rejection over `n.bit_length()` bits
    /// (`n` below 2³²).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(
            n > 0 && n <= u32::MAX as usize,
            "below(n) needs 0 < n < 2^32"
        );
        let bits = usize::BITS - n.leading_zeros();
        loop {
            let r = (self.next_u32() >> (32 - bits)) as usize;
            if r < n {
                return r;
            }
        }
    }

    /// `random.sample(range(n), k)`: `k` distinct indices below `n`, in drawing order.
    pub fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        assert!(k <= n, "sample larger than population");
        let mut setsize = 21usize;
        if k > 5 {
            // 4 ** ceil(log(3k, 4))
            let exponent = ((k * 3) as f64).log(4.0).ceil() as u32;
            setsize += 4usize.pow(exponent);
        }
        let mut result = Vec::with_capacity(k);
        if n <= setsize {
            let mut pool: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = self.below(n - i);
                result.push(pool[j]);
                pool[j] = pool[n - i - 1];
            }
        } else {
            let mut selected = std::collections::HashSet::with_capacity(k);
            for _ in 0..k {
                let mut j = self.below(n);
                while selected.contains(&j) {
                    j = self.below(n);
                }
                selected.insert(j);
                result.push(j);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_equal_cpython() {
        // python3: r = random.Random(1234); r.sample(range(100), 5) … (CPython 3.11)
        let mut r = PyRandom::new(1234);
        assert_eq!(r.sample(100, 5), vec![99, 56, 14, 0, 11]);
        assert_eq!(r.sample(100, 5), vec![74, 4, 85, 88, 10]);
        assert_eq!(r.sample(10, 5), vec![1, 5, 3, 0, 6]);
        assert_eq!(
            r.sample(7473, 8),
            vec![6461, 129, 2835, 5311, 5105, 3966, 5044, 3797]
        );
    }
}
