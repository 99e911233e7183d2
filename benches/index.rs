//! Vector index benchmark: exact search vs the two HNSW libraries (usearch, hora) on
//! synthetic vectors shaped like sentence embeddings.
//!
//! ```text
//! cargo bench --bench index                                  # N = 10,000 (~2 min, 2 cores)
//! cargo bench --bench index -- --n 50000                     # ~5 min (3.5 min of hora build)
//! cargo bench --bench index -- --n 200000 --hora-max 50000   # usearch only above 50k
//! cargo bench --bench index -- --n 1m --impl usearch --no-filter
//! cargo bench --bench index -- --n 10000,50000 --ef 32,64,128 --queries 500
//! INDEX_BENCH_N=50000 cargo bench --bench index
//! ```
//!
//! Options: `--n LIST` (or `INDEX_BENCH_N`; `k`/`m` suffixes), `--queries Q` (200), `--k K`
//! (10), `--dim D` (384), `--ef LIST` (search beams, 32,64,128), `--m M` (16), `--efc EF`
//! (200), `--impl LIST` (usearch,hora), `--hora-max N` (build hora graphs only up to N
//! vectors: its build takes minutes per 10k), `--no-filter` (skip the global-vs-per-collection
//! part, which uses hora), `--seed S`, `--data-dir DIR` (real embeddings: every vector
//! stored in a ragway data dir, e.g. one filled by `ragway ingest`; the queries are `Q` of
//! its chunks, held out of the index, so a query is a real passage's embedding and its
//! nearest neighbours are other passages; `--n` then caps how many are used),
//! `--graph-cache DIR` (keep built graphs there and load them on the next run with the same
//! data and parameters instead of building again: a 1M build takes ~15 minutes).
//!
//! Data: 200 cluster centroids sharing a common direction (sentence embeddings are
//! anisotropic: unrelated sentences still have cosine ~0.1), cluster sizes log-normal, each
//! point = centroid + low-rank per-cluster spread (16 directions: topics vary along few axes)
//! plus isotropic noise, L2-normalised. Point-to-centroid cosine ≈ 0.7, same-cluster pairs ≈ 0.5.
//! Queries are held-out points from the same process, perturbed again (a question is not a
//! copy of its passage). Recall@k is measured against exact search. Memory is counted by a
//! global allocator (bytes held after the build; peak during the build).
//!
//! The filter part reuses the N-vector graph as one global index shared by all collections
//! and searches it for the members of one collection (a random `allowed` share of the ids),
//! against per-collection exact indexes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ragway::index::{ExactIndex, Graph, GraphKind, HnswIndex, HnswParams, VectorIndex};

/// Counts live heap bytes (and the peak since the last reset) to measure index memory.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn reset_peak() {
    PEAK.store(live(), Ordering::Relaxed);
}

#[derive(Clone)]
struct Opts {
    ns: Vec<usize>,
    queries: usize,
    k: usize,
    dim: usize,
    efs: Vec<usize>,
    m: usize,
    efc: usize,
    impls: Vec<GraphKind>,
    hora_max: usize,
    data_dir: Option<std::path::PathBuf>,
    graph_cache: Option<std::path::PathBuf>,
    filter: bool,
    seed: u64,
}

fn parse_list(s: &str) -> Vec<usize> {
    s.split(',')
        .map(|x| {
            let x = x.trim().replace('_', "");
            let (num, mult) = if let Some(n) = x.strip_suffix(['k', 'K']) {
                (n.to_string(), 1000)
            } else if let Some(n) = x.strip_suffix(['m', 'M']) {
                (n.to_string(), 1_000_000)
            } else {
                (x, 1)
            };
            num.parse::<usize>().expect("a number") * mult
        })
        .collect()
}

fn opts() -> Opts {
    let mut o = Opts {
        ns: std::env::var("INDEX_BENCH_N").map_or(vec![10_000], |s| parse_list(&s)),
        queries: 200,
        k: 10,
        dim: 384,
        efs: vec![32, 64, 128],
        m: 16,
        efc: 200,
        impls: vec![GraphKind::Usearch, GraphKind::Hora],
        hora_max: usize::MAX,
        data_dir: None,
        graph_cache: None,
        filter: true,
        seed: 42,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--n" => o.ns = parse_list(&val()),
            "--queries" => o.queries = parse_list(&val())[0],
            "--k" => o.k = parse_list(&val())[0],
            "--dim" => o.dim = parse_list(&val())[0],
            "--ef" => o.efs = parse_list(&val()),
            "--m" => o.m = parse_list(&val())[0],
            "--efc" => o.efc = parse_list(&val())[0],
            "--hora-max" | "--hnsw-max" => o.hora_max = parse_list(&val())[0],
            "--impl" => {
                o.impls = val()
                    .split(',')
                    .map(|s| s.parse().unwrap_or_else(|e| panic!("--impl: {e}")))
                    .collect()
            }
            "--no-filter" => o.filter = false,
            "--data-dir" => o.data_dir = Some(val().into()),
            "--graph-cache" => o.graph_cache = Some(val().into()),
            "--seed" => o.seed = parse_list(&val())[0] as u64,
            // `cargo bench` passes `--bench` to harness-less benches.
            "--bench" => {}
            other => panic!("unknown option {other} (see the top of benches/index.rs)"),
        }
    }
    o
}

/// splitmix64 + Box-Muller: seedable and dependency-free.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn gauss(&mut self) -> f32 {
        let u1 = self.unit().max(1e-12);
        let u2 = self.unit();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
    fn gauss_vec(&mut self, dim: usize) -> Vec<f32> {
        (0..dim).map(|_| self.gauss()).collect()
    }
}

fn normalize(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

const CLUSTERS: usize = 200;
const RANK: usize = 16;

struct Cluster {
    centroid: Vec<f32>,
    /// RANK directions (row-major, RANK × dim), each of norm ~1.
    basis: Vec<f32>,
    spread: f32,
}

struct Generator {
    dim: usize,
    clusters: Vec<Cluster>,
    /// Cumulative cluster weights (log-normal sizes).
    cumulative: Vec<f64>,
    rng: Rng,
}

impl Generator {
    fn new(dim: usize, seed: u64) -> Generator {
        let mut rng = Rng(seed);
        let common = normalize(rng.gauss_vec(dim));
        let scale = 1.0 / (dim as f32).sqrt();
        let clusters: Vec<Cluster> = (0..CLUSTERS)
            .map(|_| {
                let own = normalize(rng.gauss_vec(dim));
                let centroid =
                    normalize(own.iter().zip(&common).map(|(o, c)| o + 0.35 * c).collect());
                let basis = (0..RANK * dim).map(|_| rng.gauss() * scale).collect();
                let spread = 0.8 + 0.4 * rng.unit() as f32;
                Cluster {
                    centroid,
                    basis,
                    spread,
                }
            })
            .collect();
        let mut total = 0.0;
        let cumulative = (0..CLUSTERS)
            .map(|_| {
                total += (0.7 * rng.gauss() as f64).exp();
                total
            })
            .collect();
        Generator {
            dim,
            clusters,
            cumulative,
            rng,
        }
    }

    /// One point: centroid + spread · (0.2 · low-rank part + 0.5 · isotropic part).
    fn point(&mut self, extra_noise: f32) -> Vec<f32> {
        let total = *self.cumulative.last().expect("clusters");
        let r = self.rng.unit() * total;
        let j = self
            .cumulative
            .partition_point(|&c| c < r)
            .min(CLUSTERS - 1);
        let c = &self.clusters[j];
        let dim = self.dim;
        let iso = 0.5 / (dim as f32).sqrt();
        let mut v = c.centroid.clone();
        for r in 0..RANK {
            let z = 0.2 * c.spread * self.rng.gauss();
            for (x, b) in v.iter_mut().zip(&c.basis[r * dim..(r + 1) * dim]) {
                *x += z * b;
            }
        }
        let noise = (1.0 + extra_noise) * c.spread * iso;
        for x in v.iter_mut() {
            *x += noise * self.rng.gauss();
        }
        normalize(v)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

struct Latency {
    p50: f64,
    p99: f64,
}

/// Times each query alone (after one untimed pass to warm caches) and returns the results.
fn timed(
    queries: &[Vec<f32>],
    mut f: impl FnMut(&[f32]) -> Vec<(u64, f32)>,
) -> (Latency, Vec<Vec<u64>>) {
    for q in queries.iter().take(20) {
        std::hint::black_box(f(q));
    }
    let mut times = Vec::with_capacity(queries.len());
    let mut results = Vec::with_capacity(queries.len());
    for q in queries {
        let t = Instant::now();
        let r = f(q);
        times.push(t.elapsed());
        results.push(r.into_iter().map(|(id, _)| id).collect());
    }
    times.sort();
    let lat = Latency {
        p50: percentile(&times, 0.5),
        p99: percentile(&times, 0.99),
    };
    (lat, results)
}

fn recall(truth: &[Vec<u64>], got: &[Vec<u64>]) -> f64 {
    let mut hit = 0;
    let mut total = 0;
    for (t, g) in truth.iter().zip(got) {
        total += t.len();
        hit += g.iter().filter(|id| t.contains(id)).count();
    }
    if total == 0 {
        1.0
    } else {
        hit as f64 / total as f64
    }
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

struct Row {
    name: String,
    build_s: f64,
    heap: usize,
    peak: usize,
    lat: Latency,
    recall: f64,
}

fn print_table(n: usize, rows: &[Row]) {
    let exact = &rows[0];
    println!(
        "{:<14} {:>9} {:>8} {:>8} {:>6} {:>8} {:>8} {:>9} {:>9} {:>9}",
        "index",
        "build s",
        "heap MB",
        "peak MB",
        "B/vec",
        "p50 ms",
        "p99 ms",
        "recall@k",
        "p50/exact",
        "heap/exact"
    );
    for r in rows {
        println!(
            "{:<14} {:>9.2} {:>8.1} {:>8.1} {:>6} {:>8.3} {:>8.3} {:>9.3} {:>9.2} {:>9.2}",
            r.name,
            r.build_s,
            mb(r.heap),
            mb(r.peak),
            r.heap / n.max(1),
            r.lat.p50,
            r.lat.p99,
            r.recall,
            r.lat.p50 / exact.lat.p50,
            r.heap as f64 / exact.heap as f64,
        );
    }
}

fn run(o: &Opts, n: usize) {
    let t = Instant::now();
    let (data, queries, dim) = match &o.data_dir {
        Some(dir) => real_vectors(dir, n, o.queries, o.seed),
        None => {
            let mut generator = Generator::new(o.dim, o.seed);
            let data: Vec<(u64, Vec<f32>)> = (0..n)
                .map(|i| (i as u64 * 3 + 1, generator.point(0.0)))
                .collect();
            let queries: Vec<Vec<f32>> = (0..o.queries).map(|_| generator.point(0.5)).collect();
            (data, queries, o.dim)
        }
    };
    let o = &Opts { dim, ..o.clone() };
    let n = data.len();
    println!(
        "\n== N = {n}, dim {}, {} queries, k = {} ({} in {:.1} s)",
        o.dim,
        queries.len(),
        o.k,
        if o.data_dir.is_some() {
            "real embeddings loaded"
        } else {
            "data generated"
        },
        t.elapsed().as_secs_f64()
    );

    let mut rows = Vec::new();

    let before = live();
    reset_peak();
    let t = Instant::now();
    let mut exact = ExactIndex::with_capacity(o.dim, n);
    exact
        .extend(data.iter().map(|(id, v)| (*id, v.as_slice())))
        .expect("valid vectors");
    let build_s = t.elapsed().as_secs_f64();
    let heap = live() - before;
    let peak = PEAK.load(Ordering::Relaxed) - before;
    let (lat, truth) = timed(&queries, |q| exact.search(q, o.k, &|_| true));
    let avg_best: f64 = queries
        .iter()
        .map(|q| exact.search(q, 1, &|_| true)[0].1 as f64)
        .sum::<f64>()
        / queries.len().max(1) as f64;
    rows.push(Row {
        name: "exact".into(),
        build_s,
        heap,
        peak,
        lat,
        recall: 1.0,
    });
    println!("(mean cosine of a query's best match: {avg_best:.3})");

    let mut hora = None;
    for &kind in &o.impls {
        if kind == GraphKind::Hora && n > o.hora_max {
            continue;
        }
        let params = HnswParams {
            m: o.m,
            ef_construction: o.efc,
            ef_search: o.efs[0],
        };
        // Baseline before the copy handed to build (which consumes and frees it), so the
        // delta is what the graph keeps and the peak includes that copy. usearch allocates
        // in C++, outside the counting allocator: its heap is its own `memory_usage()`.
        let before = live();
        reset_peak();
        let cached = o.graph_cache.as_ref().map(|dir| {
            let source = match &o.data_dir {
                Some(d) => format!("real{:016x}", fnv(d.to_string_lossy().as_bytes())),
                None => format!("synthetic{}", o.seed),
            };
            dir.join(format!(
                "{source}-{n}-{}-m{}-efc{}.{kind}",
                o.dim, o.m, o.efc
            ))
        });
        let t = Instant::now();
        let (g, build_s) = match cached.as_deref().map(|p| Graph::load(kind, p)) {
            Some(Ok(g)) => {
                println!("({kind} graph loaded from the cache: build time below is the load)");
                (g, t.elapsed().as_secs_f64())
            }
            _ => {
                let g = Graph::build(kind, o.dim, data.clone(), params).expect("build");
                let build_s = t.elapsed().as_secs_f64();
                if let Some(p) = &cached {
                    std::fs::create_dir_all(p.parent().expect("cache dir")).expect("cache dir");
                    g.save(p).expect("cache the graph");
                }
                (g, build_s)
            }
        };
        let (heap, peak) = match kind {
            GraphKind::Hora => (live() - before, PEAK.load(Ordering::Relaxed) - before),
            GraphKind::Usearch => (g.memory_bytes(), g.memory_bytes()),
        };
        println!(
            "({kind} M={} ef_construction={} built in {build_s:.1} s; memory_bytes() {:.1} MB)",
            o.m,
            o.efc,
            mb(g.memory_bytes())
        );
        for &ef in &o.efs {
            g.set_ef_search(ef);
            let (lat, got) = timed(&queries, |q| g.search(q, o.k, &|_| true));
            rows.push(Row {
                name: format!("{kind} ef={ef}"),
                build_s,
                heap,
                peak,
                lat,
                recall: recall(&truth, &got),
            });
        }
        persistence(&g, n);
        if let Graph::Hora(h) = g {
            hora = Some(*h);
        }
    }
    print_table(n, &rows);

    if let Some(g) = &hora
        && o.filter
    {
        filtered(o, &exact, g, &data, &queries);
    }
}

/// Indexed (id, vector) pairs, queries, dimension.
type Dataset = (Vec<(u64, Vec<f32>)>, Vec<Vec<f32>>, usize);

/// Up to `n` stored vectors of a ragway data dir plus `queries` held-out ones, picked at
/// random (seeded).
fn real_vectors(dir: &std::path::Path, n: usize, queries: usize, seed: u64) -> Dataset {
    let store = ragway::store::Store::open(&dir.join("ragway.redb")).expect("a ragway data dir");
    let mut all: Vec<(u64, Vec<f32>)> = Vec::new();
    store
        .for_each_file_index(|_, d| all.extend(d.ids.into_iter().zip(d.vectors)))
        .expect("readable vectors");
    assert!(
        all.len() > queries,
        "only {} vectors in {}",
        all.len(),
        dir.display()
    );
    // Fisher-Yates with the bench's generator.
    let mut rng = Rng(seed);
    for i in (1..all.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        all.swap(i, j);
    }
    let held_out: Vec<Vec<f32>> = all.drain(..queries).map(|(_, v)| v).collect();
    all.truncate(n);
    let dim = all[0].1.len();
    (all, held_out, dim)
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn persistence(g: &Graph, n: usize) {
    let dir = std::env::temp_dir().join(format!("ragway-index-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("bench-{n}.{}", g.kind()));
    let t = Instant::now();
    g.save(&path).expect("save");
    let save_s = t.elapsed().as_secs_f64();
    let bytes: u64 = std::fs::read_dir(&dir)
        .expect("temp dir")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum();
    let t = Instant::now();
    let loaded = Graph::load(g.kind(), &path).expect("load");
    let load_s = t.elapsed().as_secs_f64();
    assert_eq!(loaded.len(), g.len());
    println!(
        "{} persistence: save {save_s:.2} s, load {load_s:.2} s, files {:.1} MB",
        g.kind(),
        mb(bytes as usize)
    );
    drop(loaded);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One global graph filtered to a collection's members vs an exact index per collection.
fn filtered(
    o: &Opts,
    exact: &ExactIndex,
    g: &HnswIndex,
    data: &[(u64, Vec<f32>)],
    queries: &[Vec<f32>],
) {
    let ef = o.efs.iter().copied().find(|&e| e >= 64).unwrap_or(o.efs[0]);
    g.set_ef_search(ef);
    println!(
        "one global graph (ef={ef}) filtered to a collection vs one exact index per collection, k = {}:",
        o.k
    );
    println!(
        "{:>8} {:>8} | {:>20} | {:>20} | {:>20} | {:>14}",
        "allowed",
        "members",
        "global post-filter",
        "global widening ×16",
        "global exact+filter",
        "per-coll exact"
    );
    println!(
        "{:>8} {:>8} | {:>9} {:>10} | {:>9} {:>10} | {:>9} {:>10} | {:>14}",
        "", "", "recall", "p50 ms", "recall", "p50 ms", "recall", "p50 ms", "p50 ms"
    );
    for share in [0.5, 0.1, 0.01] {
        let mut rng = Rng(o.seed ^ 0x5eed);
        let members: HashSet<u64> = data
            .iter()
            .filter(|_| rng.unit() < share)
            .map(|(id, _)| *id)
            .collect();
        let allow = |id: u64| members.contains(&id);
        let (exact_lat, truth) = timed(queries, |q| exact.search(q, o.k, &allow));
        let (post_lat, post) = timed(queries, |q| {
            g.candidates(q, o.k.max(ef))
                .into_iter()
                .filter(|(id, _)| allow(*id))
                .take(o.k)
                .collect()
        });
        let (wide_lat, wide) = timed(queries, |q| g.search(q, o.k, &allow));
        let mut own = ExactIndex::with_capacity(o.dim, members.len());
        own.extend(
            data.iter()
                .filter(|(id, _)| members.contains(id))
                .map(|(id, v)| (*id, v.as_slice())),
        )
        .expect("valid vectors");
        let (own_lat, own_res) = timed(queries, |q| own.search(q, o.k, &|_| true));
        assert_eq!(recall(&truth, &own_res), 1.0);
        println!(
            "{:>7.0}% {:>8} | {:>9.3} {:>10.3} | {:>9.3} {:>10.3} | {:>9.3} {:>10.3} | {:>14.3}",
            share * 100.0,
            members.len(),
            recall(&truth, &post),
            post_lat.p50,
            recall(&truth, &wide),
            wide_lat.p50,
            1.0,
            exact_lat.p50,
            own_lat.p50
        );
    }
}

fn main() {
    let o = opts();
    #[cfg(target_arch = "x86_64")]
    let kernel = if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        "avx2+fma"
    } else {
        "portable"
    };
    #[cfg(not(target_arch = "x86_64"))]
    let kernel = "portable";
    println!(
        "ragway index bench: {} threads available, exact dot kernel {kernel}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    for &n in &o.ns {
        run(&o, n);
    }
}
