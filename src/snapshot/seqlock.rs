//! A seqlock that publishes a plain-old-data value to any number of readers.
//!
//! The publisher bumps a sequence number to odd, writes the value, then bumps it to
//! even; a reader copies the value between two loads of the sequence and keeps the copy
//! only if both loads agree on an even number. Following Boehm ("Can seqlocks get along
//! with programming language memory models?", MSPC 2012) the value lives in a row of
//! `AtomicU64` words written and read with `Relaxed` and fenced at both ends, rather
//! than in an `UnsafeCell` read racily: there is no data race and no `unsafe`, and every
//! access goes through `crate::limiter::sync`, so loom can check the protocol.
//!
//! Guarantees: a read returns a value exactly as one `publish` (or `new`) wrote it, never
//! a mix of two, together with that publish's sequence number; sequences seen by one
//! thread never go backwards. The publisher never waits for readers and readers never
//! allocate; a reader retries while a publish is in progress, spinning and then yielding
//! its thread (`try_read_into` makes one attempt instead). Several publishers are
//! allowed: each claims the sequence with a CAS from even to odd, and one that finds it
//! odd waits the same way until the other is done. Any `T: Pod` works: the value's
//! bytes are split into 8-byte words, the last one zero-padded, and copied word by word
//! through `u64::to_ne_bytes`, so neither `T`'s size nor its alignment matters.

use std::fmt;
use std::marker::PhantomData;

use bytemuck::Pod;

use crate::limiter::sync::{fence, spin, AtomicU64, Ordering};

/// A value of type `T` published by one (or a few) writers and read by many.
pub struct SeqLock<T: Pod> {
    /// Even: the value in `words` is the one published with this number. Odd: a
    /// publish is in progress.
    seq: AtomicU64,
    /// `T`'s bytes in 8-byte native-endian words, the last one zero-padded.
    words: Box<[AtomicU64]>,
    _t: PhantomData<T>,
}

/// One turn of waiting out a publish in progress: a spin at first, then a yield of the
/// CPU, since a publisher preempted mid-write keeps the sequence odd for a whole time
/// slice. Under loom always `spin()`, which yields to the model checker.
fn back_off(turn: u32) {
    /// Turns spent spinning before a waiter starts yielding.
    const SPINS: u32 = 64;
    if cfg!(not(sidecar_loom)) && turn > SPINS {
        std::thread::yield_now();
    } else {
        spin();
    }
}

/// The bytes of one (possibly short, final) chunk of a value as a word.
fn word_of(chunk: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[..chunk.len()].copy_from_slice(chunk);
    u64::from_ne_bytes(bytes)
}

impl<T: Pod> SeqLock<T> {
    /// A seqlock holding `value`, published as sequence 0.
    pub fn new(value: T) -> Self {
        let words = bytemuck::bytes_of(&value)
            .chunks(8)
            .map(|chunk| AtomicU64::new(word_of(chunk)))
            .collect();
        Self {
            seq: AtomicU64::new(0),
            words,
            _t: PhantomData,
        }
    }

    /// Publishes `value` and returns its (even) sequence number, two above the previous.
    ///
    /// Meant for one publisher; concurrent publishers are correct but take turns: each
    /// claims the sequence by moving it from even to odd and spins while another holds
    /// it.
    pub fn publish(&self, value: &T) -> u64 {
        // Relaxed: only a guess for the CAS below, which does the ordering.
        let mut s = self.seq.load(Ordering::Relaxed);
        let mut turn = 0u32;
        loop {
            if s & 1 == 1 {
                turn = turn.saturating_add(1);
                back_off(turn);
                // Relaxed: again only a guess for the CAS.
                s = self.seq.load(Ordering::Relaxed);
                continue;
            }
            match self.seq.compare_exchange(
                s,
                s.wrapping_add(1),
                // Acquire: synchronises with the previous publisher's Release store of
                // `s`, so its word stores come before ours in each word's order.
                Ordering::Acquire,
                // Relaxed: a failed claim publishes and reads nothing.
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(current) => {
                    turn = turn.saturating_add(1);
                    back_off(turn);
                    s = current;
                }
            }
        }
        // Release: a reader that loads any word stored below and then fences with
        // Acquire also sees the odd sequence stored above, so it rejects its copy.
        fence(Ordering::Release);
        for (word, chunk) in self.words.iter().zip(bytemuck::bytes_of(value).chunks(8)) {
            // Relaxed: ordered by the fence above and the Release store below.
            word.store(word_of(chunk), Ordering::Relaxed);
        }
        let published = s.wrapping_add(2);
        // Release: a reader that loads this even number also sees every word above.
        self.seq.store(published, Ordering::Release);
        published
    }

    /// Copies the latest published value into `out` and returns its sequence number.
    ///
    /// Retries while a publish is in progress or tore the copy; never allocates. While
    /// it runs `out` may hold a torn value (harmless: `T` is `Pod`); on return it holds
    /// exactly the value published with the returned sequence.
    pub fn read_into(&self, out: &mut T) -> u64 {
        self.read_counting(out).0
    }

    /// One attempt at `read_into`: `None`, with `out` holding garbage, if a publish was
    /// in progress or tore the copy. For callers that would rather not spin.
    pub fn try_read_into(&self, out: &mut T) -> Option<u64> {
        // Acquire: pairs with `publish`'s final Release store, so the words loaded below
        // are at least those published with `s1`.
        let s1 = self.seq.load(Ordering::Acquire);
        if s1 & 1 == 1 {
            return None;
        }
        let bytes = bytemuck::bytes_of_mut(out);
        for (chunk, word) in bytes.chunks_mut(8).zip(self.words.iter()) {
            // Relaxed: ordered by the Acquire load above and the fence below.
            let w = word.load(Ordering::Relaxed).to_ne_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
        // Acquire: if any word above came from a later publish, that publish's odd claim
        // (made before its Release fence) is visible to the load below.
        fence(Ordering::Acquire);
        // Relaxed: the fence above already orders it after the word loads.
        let s2 = self.seq.load(Ordering::Relaxed);
        (s1 == s2).then_some(s1)
    }

    /// `read_into`, also returning how many attempts were thrown away.
    fn read_counting(&self, out: &mut T) -> (u64, u32) {
        let mut retries = 0u32;
        loop {
            if let Some(seq) = self.try_read_into(out) {
                return (seq, retries);
            }
            retries = retries.saturating_add(1);
            back_off(retries);
        }
    }

    /// The latest published value and its sequence number.
    pub fn read(&self) -> (T, u64) {
        let mut out = T::zeroed();
        let seq = self.read_into(&mut out);
        (out, seq)
    }

    /// The sequence number of the latest completed publish (even; 0 before any).
    pub fn sequence(&self) -> u64 {
        // Acquire: pairs with `publish`'s Release store, so what the publisher did
        // before publishing this number is visible to the caller.
        self.seq.load(Ordering::Acquire) & !1
    }
}

impl<T: Pod> fmt::Debug for SeqLock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeqLock")
            .field("sequence", &self.sequence())
            .field("words", &self.words.len())
            .finish()
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, Ordering as StdOrdering};
    use std::sync::{Arc, Barrier};
    use std::thread;
    use std::time::{Duration, Instant};

    use bytemuck::{Pod, Zeroable};

    use super::*;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
    struct Small {
        a: u64,
        b: u32,
        c: u32,
    }

    /// 64 words all equal to a counter `i`, plus a checksum word `i * 31`.
    #[repr(C)]
    #[derive(Clone, Copy, Pod, Zeroable)]
    struct Big {
        words: [u64; 64],
        check: u64,
    }

    impl Big {
        fn of(i: u64) -> Self {
            Self {
                words: [i; 64],
                check: i.wrapping_mul(31),
            }
        }

        /// The counter if the value is whole, else `None`.
        fn whole(&self) -> Option<u64> {
            let i = self.words[0];
            (self.words.iter().all(|&w| w == i) && self.check == i.wrapping_mul(31)).then_some(i)
        }
    }

    #[test]
    fn a_value_round_trips() {
        let v = Small { a: 1, b: 2, c: 3 };
        let lock = SeqLock::new(v);
        assert_eq!(lock.read(), (v, 0));
        let w = Small {
            a: u64::MAX,
            b: 7,
            c: u32::MAX,
        };
        assert_eq!(lock.publish(&w), 2);
        let mut out = Small::zeroed();
        assert_eq!(lock.read_into(&mut out), 2);
        assert_eq!(out, w);
    }

    #[test]
    fn the_sequence_advances_by_two_per_publish() {
        let lock = SeqLock::new(0u64);
        assert_eq!(lock.sequence(), 0);
        for i in 1..=10u64 {
            assert_eq!(lock.publish(&i), 2 * i);
            assert_eq!(lock.sequence(), 2 * i);
            assert_eq!(lock.read(), (i, 2 * i));
        }
    }

    #[test]
    fn values_of_any_size_and_alignment_round_trip() {
        let lock = SeqLock::new([1u32, 2, 3]);
        assert_eq!(lock.publish(&[4, 5, 6]), 2);
        assert_eq!(lock.read(), ([4, 5, 6], 2));

        let bytes: [u8; 13] = *b"hello, world!";
        let lock = SeqLock::new(bytes);
        assert_eq!(lock.read(), (bytes, 0));
        lock.publish(b"HELLO, WORLD?");
        assert_eq!(lock.read(), (*b"HELLO, WORLD?", 2));

        let lock = SeqLock::new(());
        assert_eq!(lock.publish(&()), 2);
        assert_eq!(lock.read(), ((), 2));
    }

    #[test]
    fn debug_shows_the_sequence() {
        let lock = SeqLock::new(Small::zeroed());
        lock.publish(&Small::zeroed());
        assert_eq!(format!("{lock:?}"), "SeqLock { sequence: 2, words: 2 }");
    }

    #[test]
    fn readers_never_see_a_torn_value_while_a_writer_publishes() {
        const PUBLISHES: u64 = 200_000;
        const READERS: usize = 4;
        let started = Instant::now();
        let lock = Arc::new(SeqLock::new(Big::of(0)));
        let done = Arc::new(AtomicBool::new(false));
        let barrier = Arc::new(Barrier::new(READERS + 1));

        let readers: Vec<_> = (0..READERS)
            .map(|_| {
                let (lock, done, barrier) = (lock.clone(), done.clone(), barrier.clone());
                thread::spawn(move || {
                    let mut out = Big::zeroed();
                    // Values read while the writer was still publishing.
                    let mut midstream = HashSet::new();
                    let (mut last, mut reads, mut retries) = (0u64, 0u64, 0u64);
                    barrier.wait();
                    loop {
                        // Checked after the read, so the last read sees the last value.
                        let finished = done.load(StdOrdering::Acquire);
                        let (seq, torn) = lock.read_counting(&mut out);
                        let i = out.whole().expect("a read returned a torn value");
                        assert_eq!(seq, 2 * i, "a value read with another's sequence");
                        assert!(seq >= last, "sequence went back from {last} to {seq}");
                        last = seq;
                        if 0 < i && i < PUBLISHES {
                            midstream.insert(i);
                        }
                        reads += 1;
                        retries += u64::from(torn);
                        if finished {
                            assert_eq!(i, PUBLISHES, "the final value is the last published");
                            return (midstream.len(), reads, retries);
                        }
                    }
                })
            })
            .collect();

        barrier.wait();
        for i in 1..=PUBLISHES {
            assert_eq!(lock.publish(&Big::of(i)), 2 * i);
            // Bursts of back-to-back publishes (readers mostly retry) and short pauses
            // (readers get through): a tight loop alone would starve the readers.
            if i % 16 == 0 {
                let until = Instant::now() + Duration::from_micros(5);
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
        }
        done.store(true, StdOrdering::Release);

        let mut total_midstream = 0;
        for (n, reader) in readers.into_iter().enumerate() {
            let (midstream, reads, retries) = reader.join().unwrap();
            println!(
                "reader {n}: {reads} reads, {midstream} distinct values mid-stream, \
                 {retries} torn attempts retried"
            );
            total_midstream += midstream;
        }
        println!(
            "{PUBLISHES} publishes, {READERS} readers: {total_midstream} distinct values read \
             mid-stream in {:?}",
            started.elapsed()
        );
        // Proof the reads overlapped the publishes. Typically hundreds or more; the bound
        // is low because on a loaded two-core machine the five threads mostly take turns.
        assert!(
            total_midstream >= 16,
            "readers saw only {total_midstream} distinct values mid-stream: no real concurrency"
        );
    }

    #[test]
    fn concurrent_writers_take_turns_and_never_mix_values() {
        const WRITERS: u64 = 3;
        const PUBLISHES: u64 = 20_000;
        let lock = Arc::new(SeqLock::new(Big::of(0)));
        let done = Arc::new(AtomicBool::new(false));
        let barrier = Arc::new(Barrier::new(WRITERS as usize + 1));

        let reader = {
            let (lock, done) = (lock.clone(), done.clone());
            thread::spawn(move || {
                let mut out = Big::zeroed();
                let mut last = 0;
                while !done.load(StdOrdering::Acquire) {
                    let seq = lock.read_into(&mut out);
                    assert!(out.whole().is_some(), "a read returned a mixed value");
                    assert!(seq >= last, "sequence went backwards");
                    last = seq;
                }
            })
        };
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (lock, barrier) = (lock.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    for i in 0..PUBLISHES {
                        let seq = lock.publish(&Big::of(w * PUBLISHES + i));
                        assert_eq!(seq & 1, 0, "an odd sequence returned");
                    }
                })
            })
            .collect();
        barrier.wait();
        for writer in writers {
            writer.join().unwrap();
        }
        done.store(true, StdOrdering::Release);
        reader.join().unwrap();

        let (last, seq) = lock.read();
        assert_eq!(seq, 2 * WRITERS * PUBLISHES, "every publish counted once");
        assert!(last.whole().is_some(), "the final value is whole");
    }
}

#[cfg(all(test, sidecar_loom))]
mod loom_tests {
    //! Loom models of the seqlock: every interleaving (and every stale `Relaxed` load
    //! loom allows) of publishers and readers yields whole values only.

    use bytemuck::{Pod, Zeroable};
    use loom::sync::Arc;
    use loom::thread;

    use super::*;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
    struct Three([u64; 3]);

    fn three(v: u64) -> Three {
        Three([v; 3])
    }

    /// The value's counter, asserting it is whole.
    fn whole(t: &Three) -> u64 {
        assert!(t.0.iter().all(|&w| w == t.0[0]), "mixed value {t:?}");
        t.0[0]
    }

    /// Every model is bounded to three preemptions, as the limiter's three-thread loom
    /// tests are: enough to interrupt each thread anywhere inside a publish or a read,
    /// and seconds instead of minutes (the unbounded two-thread model takes ~4 min).
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(f);
    }

    fn spawn_reader(lock: &Arc<SeqLock<Three>>) -> thread::JoinHandle<(u64, u64)> {
        let lock = Arc::clone(lock);
        thread::spawn(move || {
            let (value, seq) = lock.read();
            (whole(&value), seq)
        })
    }

    /// One attempt, without spinning: loom cannot finish a model in which two threads
    /// spin-wait at once (they may take turns yielding to each other forever), so the
    /// three-thread models use `try_read_into`, whose result is what is checked.
    fn try_read(lock: &SeqLock<Three>) -> Option<(u64, u64)> {
        let mut out = Three::zeroed();
        let seq = lock.try_read_into(&mut out)?;
        Some((whole(&out), seq))
    }

    #[test]
    fn loom_seqlock_a_reader_sees_a_whole_value_across_two_publishes() {
        model(|| {
            let lock = Arc::new(SeqLock::new(three(0)));
            let reader = spawn_reader(&lock);
            assert_eq!(lock.publish(&three(1)), 2);
            assert_eq!(lock.publish(&three(2)), 4);
            let (v, seq) = reader.join().unwrap();
            assert!(v <= 2, "value {v} was never published");
            assert_eq!(seq, 2 * v, "value {v} read with sequence {seq}");
            assert_eq!(lock.read(), (three(2), 4));
        });
    }

    #[test]
    fn loom_seqlock_two_readers_and_a_writer() {
        model(|| {
            let lock = Arc::new(SeqLock::new(three(0)));
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let lock = Arc::clone(&lock);
                    thread::spawn(move || try_read(&lock))
                })
                .collect();
            assert_eq!(lock.publish(&three(1)), 2);
            for reader in readers {
                if let Some((v, seq)) = reader.join().unwrap() {
                    assert!(v <= 1, "value {v} was never published");
                    assert_eq!(seq, 2 * v, "value {v} read with sequence {seq}");
                }
            }
            assert_eq!(lock.read(), (three(1), 2));
        });
    }

    #[test]
    fn loom_seqlock_two_writers_take_turns_and_a_reader_sees_whole_values() {
        model(|| {
            let lock = Arc::new(SeqLock::new(three(0)));
            let writers: Vec<_> = [1, 2]
                .into_iter()
                .map(|v| {
                    let lock = Arc::clone(&lock);
                    thread::spawn(move || lock.publish(&three(v)))
                })
                .collect();
            let read = try_read(&lock);
            // seqs[k]: the sequence writer k + 1 (publishing value k + 1) got.
            let seqs: Vec<u64> = writers.into_iter().map(|w| w.join().unwrap()).collect();
            let mut sorted = seqs.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [2, 4], "each publish got its own sequence");
            match read {
                None => {}
                Some((0, seq)) => assert_eq!(seq, 0, "the initial value read with {seq}"),
                Some((v, seq)) => {
                    assert!(v <= 2, "value {v} was never published");
                    assert_eq!(seq, seqs[v as usize - 1], "value {v} read with {seq}");
                }
            }
            let (last, seq) = lock.read();
            assert_eq!(seq, 4);
            let last = whole(&last);
            assert_eq!(
                seqs[last as usize - 1],
                4,
                "the final value is the later publish"
            );
        });
    }
}
