//! Runs a weight-only int8 model on ONNX Runtime's int8 kernels.
//!
//! The shipped all-MiniLM-L6-v2 stores its weights as int8 with a float scale per column
//! (matrices) or per row (embedding tables), and computes in float: `Cast(int8) → Mul(scale)
//! → MatMul` or `→ Gather`. ONNX Runtime's constant folding turns every such pair into a
//! float copy of the weights at load time, so each session held ~90 MiB of float weights and
//! every product ran in float. This module rewrites, in the model's bytes before ONNX Runtime
//! sees them:
//!
//! - `MatMul(x, Mul(Cast(Wq), s))` → `com.microsoft.DynamicQuantizeMatMul(x, Wq, s)`: the
//!   weights stay int8 (prepacked once and shared by every session) and the product runs on
//!   the int8 (VNNI where the CPU has it) kernels, the activations quantised per run;
//! - `Gather(Mul(Cast(Wq), s), ids)` → `Mul(Cast(Gather(Wq, ids)), Gather(s, ids))`: only
//!   the looked-up rows are converted, with the same float arithmetic as before (identical
//!   vectors), instead of a float copy of the 30,522 × 384 vocabulary table.
//!
//! With them, two subgraphs of the exported model are replaced by what they compute, which
//! changes no output bit (measured: identical hidden states) and saves 6–11 % of a run
//! (`benches/ort_kernels.py`'s shapes, one thread):
//!
//! - `Where(IsNaN(p), 0, p)` after each attention softmax → `Identity(p)` (eliminated by
//!   ONNX Runtime): the exporter's guard for a row whose every key is masked, which cannot
//!   occur here (every text keeps `[CLS]` and `[SEP]`, and padding masks keys, not whole
//!   rows), yet it cost two passes over every heads × tokens × tokens score tensor;
//! - `Mul(x, Mul(0.5, Add(Erf(Div(x, √2)), 1)))` → `com.microsoft.Gelu(x)`: the exact (erf)
//!   GELU written out in five element-wise passes, an order ONNX Runtime's own fusion does
//!   not recognise; as one `Gelu` it then fuses with the bias `Add` before it (`BiasGelu`).
//!
//! And each self-attention block (the three projections' bias additions, reshapes and
//! transposes to heads, the two scalings, the two products, the mask addition, the softmax
//! and the transpose back) becomes one `com.microsoft.MultiHeadAttention` fed by the three
//! projections and their concatenated biases: 4–9 % less per run, more for longer texts
//! (one thread, 40–250 tokens). It is not bit-identical (ONNX Runtime's kernel sums in
//! another order, and the int8 quantisation of the next layer's input then rounds a few
//! values the other way: cosine 0.997–1.0 to before on random token ids), and it drops the
//! padding mask, so the int8 embedder runs one text per run (which it did already: a run's
//! activations share one quantisation scale). Only a mask computed from the graph's inputs by
//! shape operations and comparisons with constants is taken for padding ([`padding_only`]);
//! a block with any other mask is left as it is. Nodes nothing reads any more are dropped.
//!
//! Anything that does not match exactly (other models, other layouts) is left as it is, so a
//! model without these patterns loads unchanged. The rewrite works on the protobuf wire
//! format directly: only the fields it needs are decoded, every other byte is copied.

use std::collections::{HashMap, HashSet};

/// ONNX `TensorProto.DataType` values used here.
const FLOAT: u64 = 1;
const INT8: u64 = 3;
const INT64: u64 = 7;

/// What [`rewrite`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// `MatMul`s now computed by `DynamicQuantizeMatMul`.
    pub matmuls: usize,
    /// Embedding tables now looked up in int8.
    pub gathers: usize,
    /// Attention softmax NaN guards removed.
    pub nan_guards: usize,
    /// Written-out GELUs now computed by `Gelu`.
    pub gelus: usize,
    /// Self-attention blocks now computed by `MultiHeadAttention`, without their padding
    /// mask (one text per run).
    pub attentions: usize,
}

/// Why the model's bytes could not be read as an ONNX model.
#[derive(Debug, thiserror::Error)]
#[error("malformed ONNX protobuf: {0}")]
pub struct Malformed(&'static str);

type Result<T> = std::result::Result<T, Malformed>;

// --- protobuf wire format -------------------------------------------------------------------

/// One field of a protobuf message: number, wire type and the bytes of its value (for
/// varints the value is also decoded).
#[derive(Clone, Copy)]
struct Field<'a> {
    number: u64,
    wire: u8,
    varint: u64,
    bytes: &'a [u8],
    /// The whole field as it appeared (key included), for copying it unchanged.
    raw: &'a [u8],
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos).ok_or(Malformed("truncated varint"))?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(Malformed("varint too long"))
}

fn fields(buf: &[u8]) -> Result<Vec<Field<'_>>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let key = read_varint(buf, &mut pos)?;
        let wire = u8::try_from(key & 7).unwrap_or(u8::MAX);
        let (mut varint, mut bytes): (u64, &[u8]) = (0, &[]);
        match wire {
            0 => varint = read_varint(buf, &mut pos)?,
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                bytes = buf.get(pos..pos + n).ok_or(Malformed("truncated fixed"))?;
                pos += n;
            }
            2 => {
                let len = usize::try_from(read_varint(buf, &mut pos)?)
                    .map_err(|_| Malformed("length overflow"))?;
                let end = pos.checked_add(len).ok_or(Malformed("length overflow"))?;
                bytes = buf.get(pos..end).ok_or(Malformed("truncated field"))?;
                pos = end;
            }
            _ => return Err(Malformed("unsupported wire type")),
        }
        out.push(Field {
            number: key >> 3,
            wire,
            varint,
            bytes,
            raw: &buf[start..pos],
        });
    }
    Ok(out)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(u8::try_from(v & 0x7f).unwrap_or(0) | 0x80);
        v >>= 7;
    }
    out.push(u8::try_from(v).unwrap_or(0));
}

fn put_bytes(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
    put_varint(out, number << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_int(out: &mut Vec<u8>, number: u64, v: u64) {
    put_varint(out, number << 3);
    put_varint(out, v);
}

fn text(f: &Field<'_>) -> Result<String> {
    String::from_utf8(f.bytes.to_vec()).map_err(|_| Malformed("string is not UTF-8"))
}

// --- the few ONNX messages that matter -----------------------------------------------------

/// `NodeProto`: inputs (1), outputs (2), name (3), op_type (4), attributes (5), domain (7).
struct Node {
    inputs: Vec<String>,
    outputs: Vec<String>,
    op: String,
    domain: String,
    /// `Cast`'s `to`, `Gather`'s `axis` (the attributes the patterns check).
    ints: HashMap<String, u64>,
    /// Integer lists: `Transpose`'s `perm`.
    lists: HashMap<String, Vec<u64>>,
    /// Other attributes than integers and integer lists make a node unmatchable (kept
    /// unchanged).
    other_attributes: bool,
    /// A subgraph attribute (`If`, `Loop`, `Scan`): its body may read any outer value
    /// without naming it as an input, so no node of such a model is dropped as unused.
    subgraph: bool,
}

impl Node {
    fn parse(buf: &[u8]) -> Result<Self> {
        let mut node = Node {
            inputs: Vec::new(),
            outputs: Vec::new(),
            op: String::new(),
            domain: String::new(),
            ints: HashMap::new(),
            lists: HashMap::new(),
            other_attributes: false,
            subgraph: false,
        };
        for f in fields(buf)? {
            match (f.number, f.wire) {
                (1, 2) => node.inputs.push(text(&f)?),
                (2, 2) => node.outputs.push(text(&f)?),
                (4, 2) => node.op = text(&f)?,
                (7, 2) => node.domain = text(&f)?,
                (5, 2) => {
                    // AttributeProto: name (1), i (3), g (6), ints (8), graphs (11), type
                    // (20; INT = 2, GRAPH = 5, INTS = 7, GRAPHS = 10).
                    let (mut name, mut value, mut ty) = (None, None, None);
                    let mut list = Vec::new();
                    for a in fields(f.bytes)? {
                        match (a.number, a.wire) {
                            (1, 2) => name = Some(text(&a)?),
                            (3, 0) => value = Some(a.varint),
                            (8, 0) => list.push(a.varint),
                            (8, 2) => {
                                let mut pos = 0;
                                while pos < a.bytes.len() {
                                    list.push(read_varint(a.bytes, &mut pos)?);
                                }
                            }
                            (6 | 11, 2) => node.subgraph = true,
                            (20, 0) => ty = Some(a.varint),
                            _ => {}
                        }
                    }
                    match (name, value, ty) {
                        (Some(name), Some(v), Some(2)) => {
                            node.ints.insert(name, v);
                        }
                        (Some(name), None, Some(7)) => {
                            node.lists.insert(name, list);
                        }
                        (_, _, Some(5 | 10)) => {
                            node.subgraph = true;
                            node.other_attributes = true;
                        }
                        _ => node.other_attributes = true,
                    }
                }
                _ => {}
            }
        }
        Ok(node)
    }

    fn is(&self, op: &str) -> bool {
        self.op == op && self.domain.is_empty()
    }
}

/// A new `NodeProto`.
fn node(
    name: &str,
    op: &str,
    domain: &str,
    inputs: &[&str],
    outputs: &[&str],
    ints: &[(&str, u64)],
) -> Vec<u8> {
    let mut out = Vec::new();
    for i in inputs {
        put_bytes(&mut out, 1, i.as_bytes());
    }
    for o in outputs {
        put_bytes(&mut out, 2, o.as_bytes());
    }
    put_bytes(&mut out, 3, name.as_bytes());
    put_bytes(&mut out, 4, op.as_bytes());
    for (attr, v) in ints {
        let mut a = Vec::new();
        put_bytes(&mut a, 1, attr.as_bytes());
        put_int(&mut a, 3, *v);
        put_int(&mut a, 20, 2);
        put_bytes(&mut out, 5, &a);
    }
    if !domain.is_empty() {
        put_bytes(&mut out, 7, domain.as_bytes());
    }
    out
}

/// `TensorProto`: dims (1, packed or not), data_type (2), float_data (4), name (8),
/// raw_data (9).
struct Initializer {
    dims: Vec<u64>,
    data_type: u64,
    /// The value of a one-element float tensor.
    scalar: Option<f32>,
    /// The little-endian values of a small float or int64 tensor (a bias, a shape), for the
    /// rewrites that read or combine them; `None` for the weights.
    small: Option<Vec<u8>>,
}

/// Tensors up to this size keep their values in [`Initializer::small`] (a 384-float bias is
/// 1.5 KiB); the weights are only ever copied as bytes.
const SMALL_TENSOR: usize = 64 * 1024;

impl Initializer {
    /// The values of a small float tensor.
    fn floats(&self) -> Option<Vec<f32>> {
        let data = self.small.as_ref().filter(|_| self.data_type == FLOAT)?;
        let values: Vec<f32> = data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (self.elements() == Some(values.len())).then_some(values)
    }

    /// The values of a small int64 tensor.
    fn int64s(&self) -> Option<Vec<i64>> {
        let data = self.small.as_ref().filter(|_| self.data_type == INT64)?;
        let values: Vec<i64> = data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(<[u8; 8]>::try_from(b).unwrap_or_default()))
            .collect();
        (self.elements() == Some(values.len())).then_some(values)
    }

    fn elements(&self) -> Option<usize> {
        self.dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
    }
}

fn parse_initializer(buf: &[u8]) -> Result<(String, Initializer)> {
    let mut name = String::new();
    let mut init = Initializer {
        dims: Vec::new(),
        data_type: 0,
        scalar: None,
        small: None,
    };
    // Exactly four bytes: a single float (longer data is a tensor, not a scalar).
    let one_float = |b: &[u8]| <[u8; 4]>::try_from(b).ok().map(f32::from_le_bytes);
    let mut value = None;
    // raw_data (9) and packed float_data (4) are little-endian values as they are; int64_data
    // (7) is varints; unpacked repeated fields come one value per field. `None` once past
    // `SMALL_TENSOR`.
    let mut data = Some(Vec::new());
    let add = |data: &mut Option<Vec<u8>>, bytes: &[u8]| match data {
        Some(d) if d.len() + bytes.len() <= SMALL_TENSOR => d.extend_from_slice(bytes),
        _ => *data = None,
    };
    for f in fields(buf)? {
        match (f.number, f.wire) {
            (4 | 9, 2) | (4, 5) => {
                value = one_float(f.bytes);
                add(&mut data, f.bytes);
            }
            (7, 0) => add(&mut data, &f.varint.to_le_bytes()),
            (7, 2) => {
                let mut pos = 0;
                while data.is_some() && pos < f.bytes.len() {
                    add(&mut data, &read_varint(f.bytes, &mut pos)?.to_le_bytes());
                }
            }
            (1, 0) => init.dims.push(f.varint),
            (1, 2) => {
                let mut pos = 0;
                while pos < f.bytes.len() {
                    init.dims.push(read_varint(f.bytes, &mut pos)?);
                }
            }
            (2, 0) => init.data_type = f.varint,
            (8, 2) => name = text(&f)?,
            _ => {}
        }
    }
    if init.data_type == FLOAT && init.dims.iter().all(|&d| d == 1) {
        init.scalar = value;
    }
    init.small = data;
    Ok((name, init))
}

/// The same `TensorProto` with other dims (the data is unchanged, so their product must be).
fn with_dims(buf: &[u8], dims: &[u64]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(buf.len());
    for d in dims {
        put_int(&mut out, 1, *d);
    }
    for f in fields(buf)? {
        if f.number != 1 {
            out.extend_from_slice(f.raw);
        }
    }
    Ok(out)
}

// --- the rewrite ------------------------------------------------------------------------------

/// Which node makes each value and which nodes read it, built once for every rewrite.
struct Links<'a> {
    producer: HashMap<&'a str, usize>,
    consumers: HashMap<&'a str, Vec<usize>>,
}

impl<'a> Links<'a> {
    fn of(nodes: &'a [Node]) -> Self {
        let mut links = Links {
            producer: HashMap::new(),
            consumers: HashMap::new(),
        };
        for (i, n) in nodes.iter().enumerate() {
            for output in &n.outputs {
                links.producer.insert(output.as_str(), i);
            }
            for input in &n.inputs {
                links.consumers.entry(input.as_str()).or_default().push(i);
            }
        }
        links
    }

    /// The nodes that read `value` (none for an unread or unknown value).
    fn readers(&self, value: &str) -> &[usize] {
        self.consumers.get(value).map_or(&[], Vec::as_slice)
    }
}

/// One `Cast(Wq) → Mul(s)` pair and the single node that consumes it.
struct Dequantized {
    cast: usize,
    mul: usize,
    consumer: usize,
    weights: String,
    scale: String,
}

/// Rewrites weight-only int8 patterns of an ONNX model (see the module documentation).
/// Returns the new model bytes, or `None` when nothing matched (use the original bytes).
pub fn rewrite(model: &[u8]) -> Result<Option<(Vec<u8>, Rewritten)>> {
    let top = fields(model)?;
    let Some(graph_field) = top.iter().find(|f| f.number == 7 && f.wire == 2) else {
        return Err(Malformed("no graph"));
    };
    let graph = fields(graph_field.bytes)?;
    let mut nodes = Vec::new();
    let mut inits = HashMap::new();
    let mut raw_nodes = Vec::new();
    let mut graph_inputs = HashSet::new();
    let mut graph_outputs = HashSet::new();
    let mut graph_values = HashSet::new();
    for f in &graph {
        match (f.number, f.wire) {
            (1, 2) => {
                nodes.push(Node::parse(f.bytes)?);
                raw_nodes.push(f.bytes);
            }
            (5, 2) => {
                let (name, init) = parse_initializer(f.bytes)?;
                inits.insert(name, init);
            }
            (11 | 12, 2) => {
                // ValueInfoProto: name (1).
                if let Some(n) = fields(f.bytes)?.iter().find(|v| v.number == 1) {
                    let name = text(n)?;
                    if f.number == 12 {
                        graph_outputs.insert(name.clone());
                    } else {
                        graph_inputs.insert(name.clone());
                    }
                    graph_values.insert(name);
                }
            }
            _ => {}
        }
    }
    let links = Links::of(&nodes);
    let only_consumer = |value: &str| match links.readers(value) {
        [one] if !graph_outputs.contains(value) => Some(*one),
        _ => None,
    };

    let mut matches = Vec::new();
    for (i, cast) in nodes.iter().enumerate() {
        let weights = match cast.inputs.as_slice() {
            [w] if cast.is("Cast") && !cast.other_attributes => w,
            _ => continue,
        };
        let is_int8 = inits.get(weights).is_some_and(|w| w.data_type == INT8);
        if !is_int8 || cast.ints.get("to") != Some(&FLOAT) || cast.outputs.len() != 1 {
            continue;
        }
        let Some(mul) = only_consumer(&cast.outputs[0]) else {
            continue;
        };
        let m = &nodes[mul];
        if !m.is("Mul") || m.inputs.len() != 2 || m.outputs.len() != 1 {
            continue;
        }
        let scale = if m.inputs[0] == cast.outputs[0] {
            &m.inputs[1]
        } else {
            &m.inputs[0]
        };
        let scale_is_float = inits.get(scale).is_some_and(|s| s.data_type == FLOAT);
        let scale_used_once = links.readers(scale).len() == 1;
        if !(scale_is_float && scale_used_once) {
            continue;
        }
        let Some(consumer) = only_consumer(&m.outputs[0]) else {
            continue;
        };
        matches.push(Dequantized {
            cast: i,
            mul,
            consumer,
            weights: weights.clone(),
            scale: scale.clone(),
        });
    }

    // Replacement nodes by the index of the node they replace, removed nodes, and scales whose
    // dims change ([1, N] → [N]: DynamicQuantizeMatMul wants a 1-D per-column scale).
    let mut replace: HashMap<usize, Vec<Vec<u8>>> = HashMap::new();
    let mut removed = HashSet::new();
    let mut new_dims: HashMap<String, Vec<u64>> = HashMap::new();
    let mut done = Rewritten::default();
    for d in &matches {
        let (w, s) = (&inits[&d.weights], &inits[&d.scale]);
        let c = &nodes[d.consumer];
        let dequantized = &nodes[d.mul].outputs[0];
        let name = format!("ragway_int8_{}", d.consumer);
        if c.is("MatMul")
            && c.inputs.len() == 2
            && c.inputs[1] == *dequantized
            && c.inputs[0] != *dequantized
        {
            let [_, n] = w.dims[..] else { continue };
            if !(s.dims == [1, n] || s.dims == [n]) {
                continue;
            }
            new_dims.insert(d.scale.clone(), vec![n]);
            let dq = node(
                &name,
                "DynamicQuantizeMatMul",
                "com.microsoft",
                &[&c.inputs[0], &d.weights, &d.scale],
                &[&c.outputs[0]],
                &[],
            );
            replace.insert(d.consumer, vec![dq]);
            done.matmuls += 1;
        } else if c.is("Gather")
            && c.inputs.len() == 2
            && c.inputs[0] == *dequantized
            && c.inputs[1] != *dequantized
            && !c.other_attributes
            && c.ints.keys().all(|k| k == "axis")
            && c.ints.get("axis").is_none_or(|a| *a == 0)
        {
            let [rows, _] = w.dims[..] else { continue };
            if s.dims != [rows, 1] {
                continue;
            }
            let ids = c.inputs[1].as_str();
            let (rows_q, rows_f, scales) = (
                format!("{name}_rows_q"),
                format!("{name}_rows_f"),
                format!("{name}_scales"),
            );
            replace.insert(
                d.consumer,
                vec![
                    node(
                        &format!("{name}_gq"),
                        "Gather",
                        "",
                        &[&d.weights, ids],
                        &[&rows_q],
                        &[("axis", 0)],
                    ),
                    node(
                        &format!("{name}_gs"),
                        "Gather",
                        "",
                        &[&d.scale, ids],
                        &[&scales],
                        &[("axis", 0)],
                    ),
                    node(
                        &format!("{name}_cast"),
                        "Cast",
                        "",
                        &[&rows_q],
                        &[&rows_f],
                        &[("to", FLOAT)],
                    ),
                    node(
                        &format!("{name}_mul"),
                        "Mul",
                        "",
                        &[&rows_f, &scales],
                        &[&c.outputs[0]],
                        &[],
                    ),
                ],
            );
            done.gathers += 1;
        } else {
            continue;
        }
        removed.insert(d.cast);
        removed.insert(d.mul);
    }
    simplify(
        &nodes,
        &links,
        &inits,
        &only_consumer,
        &mut replace,
        &mut removed,
        &mut done,
    );
    let subgraphs = nodes.iter().any(|n| n.subgraph);
    let biases = if subgraphs {
        Vec::new()
    } else {
        fuse_attention(
            &nodes,
            &links,
            &inits,
            &graph_inputs,
            &mut replace,
            &mut done,
        )
    };
    if done == Rewritten::default() {
        return Ok(None);
    }

    // The nodes as they will be written, in order, then without those nothing reads any more
    // (a fused attention block's reshapes and products, its mask).
    let new_nodes: HashMap<usize, Vec<Node>> = replace
        .iter()
        .map(|(&i, new)| {
            Ok((
                i,
                new.iter().map(|n| Node::parse(n)).collect::<Result<_>>()?,
            ))
        })
        .collect::<Result<_>>()?;
    let mut emitted: Vec<(&[u8], &Node)> = Vec::with_capacity(nodes.len());
    for (i, raw) in raw_nodes.iter().enumerate() {
        if let Some(new) = replace.get(&i) {
            emitted.extend(new.iter().map(Vec::as_slice).zip(&new_nodes[&i]));
        } else if !removed.contains(&i) {
            emitted.push((raw, &nodes[i]));
        }
    }
    let shown: Vec<&Node> = emitted.iter().map(|(_, n)| *n).collect();
    if let Some(live) = live_nodes(&shown, &graph_outputs) {
        let mut keep = live.into_iter();
        emitted.retain(|_| keep.next().unwrap_or(true));
    }

    // Constants that only dropped or replaced nodes read (the GELU's √2, 1 and 0.5, the
    // separate biases of a fused attention): left in, ONNX Runtime would warn about each at
    // every session load. Graph inputs and outputs are kept (older models list initializers
    // among the inputs), and so is a constant no node read to begin with.
    let mut used: HashSet<&str> = graph_values.iter().map(String::as_str).collect();
    used.extend(
        emitted
            .iter()
            .flat_map(|(_, n)| n.inputs.iter().map(String::as_str)),
    );
    let orphaned: HashSet<&str> = nodes
        .iter()
        .flat_map(|n| n.inputs.iter().map(String::as_str))
        .filter(|name| inits.contains_key(*name) && !used.contains(name))
        .collect();

    let mut new_graph = Vec::with_capacity(graph_field.bytes.len());
    let mut nodes_written = false;
    for f in &graph {
        match (f.number, f.wire) {
            (1, 2) => {
                if !nodes_written {
                    for (raw, _) in &emitted {
                        put_bytes(&mut new_graph, 1, raw);
                    }
                    nodes_written = true;
                }
            }
            (5, 2) => {
                let (name, _) = parse_initializer(f.bytes)?;
                match new_dims.get(&name) {
                    _ if orphaned.contains(name.as_str()) => {}
                    Some(dims) => put_bytes(&mut new_graph, 5, &with_dims(f.bytes, dims)?),
                    None => new_graph.extend_from_slice(f.raw),
                }
            }
            _ => new_graph.extend_from_slice(f.raw),
        }
    }
    for b in &biases {
        put_bytes(&mut new_graph, 5, b);
    }

    let mut out = Vec::with_capacity(model.len() + 64);
    let mut has_ms_opset = false;
    for f in &top {
        if f.number == 8 && f.wire == 2 {
            // OperatorSetIdProto: domain (1).
            has_ms_opset |= fields(f.bytes)?
                .iter()
                .any(|o| o.number == 1 && o.bytes == b"com.microsoft");
        }
    }
    for f in &top {
        if f.number == 7 && f.wire == 2 {
            put_bytes(&mut out, 7, &new_graph);
        } else {
            out.extend_from_slice(f.raw);
        }
    }
    if (done.matmuls > 0 || done.gelus > 0 || done.attentions > 0) && !has_ms_opset {
        let mut opset = Vec::new();
        put_bytes(&mut opset, 1, b"com.microsoft");
        put_int(&mut opset, 2, 1);
        put_bytes(&mut out, 8, &opset);
    }
    Ok(Some((out, done)))
}

/// Finds the NaN guards and written-out GELUs (see the module documentation) among nodes
/// no other rewrite touches, and records their replacements.
fn simplify(
    nodes: &[Node],
    links: &Links<'_>,
    inits: &HashMap<String, Initializer>,
    only_consumer: &dyn Fn(&str) -> Option<usize>,
    replace: &mut HashMap<usize, Vec<Vec<u8>>>,
    removed: &mut HashSet<usize>,
    done: &mut Rewritten,
) {
    let producer = &links.producer;
    let scalar = |name: &str, want: f32| {
        inits
            .get(name)
            .and_then(|i| i.scalar)
            .is_some_and(|v| (v - want).abs() <= 1e-6 * want.abs().max(1.0))
    };
    // The input of a two-input node that is not `value`, when the other one is `value`.
    let other = |n: &Node, value: &str| match n.inputs.as_slice() {
        [a, b] if a == value && b != value => Some(b.clone()),
        [a, b] if b == value && a != value => Some(a.clone()),
        _ => None,
    };
    let plain = |i: usize, op: &str| {
        let n = &nodes[i];
        n.is(op)
            && !n.other_attributes
            && n.ints.is_empty()
            && n.lists.is_empty()
            && n.outputs.len() == 1
    };
    let mut taken: HashSet<usize> = replace
        .keys()
        .copied()
        .chain(removed.iter().copied())
        .collect();
    let claim = |group: &[usize], taken: &mut HashSet<usize>| {
        if group.iter().any(|i| taken.contains(i)) {
            return false;
        }
        taken.extend(group);
        true
    };

    for (i, n) in nodes.iter().enumerate() {
        // Where(IsNaN(p), 0, p) → Identity(p).
        if plain(i, "Where") && n.inputs.len() == 3 {
            let (cond, zero, p) = (&n.inputs[0], &n.inputs[1], &n.inputs[2]);
            let Some(&isnan) = producer.get(cond.as_str()) else {
                continue;
            };
            let guard = plain(isnan, "IsNaN")
                && nodes[isnan].inputs == [p.clone()]
                && only_consumer(cond) == Some(i)
                && scalar(zero, 0.0);
            if guard && claim(&[i, isnan], &mut taken) {
                let name = format!("ragway_nan_guard_{i}");
                replace.insert(
                    i,
                    vec![node(&name, "Identity", "", &[p], &[&n.outputs[0]], &[])],
                );
                removed.insert(isnan);
                done.nan_guards += 1;
            }
            continue;
        }
        // Mul(x, Mul(0.5, Add(Erf(Div(x, √2)), 1))) → Gelu(x).
        if !plain(i, "Erf") || n.inputs.len() != 1 {
            continue;
        }
        let Some(&div) = producer.get(n.inputs[0].as_str()) else {
            continue;
        };
        let d = &nodes[div];
        let x = match d.inputs.as_slice() {
            [x, c] if plain(div, "Div") && scalar(c, std::f32::consts::SQRT_2) => x.clone(),
            _ => continue,
        };
        let chain = (|| {
            only_consumer(&d.outputs[0]).filter(|&e| e == i)?;
            let add = only_consumer(&n.outputs[0]).filter(|&a| plain(a, "Add"))?;
            other(&nodes[add], &n.outputs[0]).filter(|c| scalar(c, 1.0))?;
            let half = only_consumer(&nodes[add].outputs[0]).filter(|&h| plain(h, "Mul"))?;
            other(&nodes[half], &nodes[add].outputs[0]).filter(|c| scalar(c, 0.5))?;
            let out = only_consumer(&nodes[half].outputs[0]).filter(|&m| plain(m, "Mul"))?;
            other(&nodes[out], &nodes[half].outputs[0]).filter(|v| *v == x)?;
            Some((add, half, out))
        })();
        let Some((add, half, out)) = chain else {
            continue;
        };
        if claim(&[div, i, add, half, out], &mut taken) {
            let name = format!("ragway_gelu_{out}");
            let gelu = node(
                &name,
                "Gelu",
                "com.microsoft",
                &[&x],
                &[&nodes[out].outputs[0]],
                &[],
            );
            replace.insert(out, vec![gelu]);
            removed.extend([div, i, add, half]);
            done.gelus += 1;
        }
    }
}

/// Appends a float attribute (`AttributeProto` f = 2, type FLOAT = 1) to a new node.
fn with_float(mut node: Vec<u8>, name: &str, value: f32) -> Vec<u8> {
    let mut a = Vec::new();
    put_bytes(&mut a, 1, name.as_bytes());
    put_varint(&mut a, 2 << 3 | 5);
    a.extend_from_slice(&value.to_le_bytes());
    put_int(&mut a, 20, 1);
    put_bytes(&mut node, 5, &a);
    node
}

/// A new float `TensorProto` with its values as raw data.
fn float_tensor(name: &str, values: &[f32]) -> Vec<u8> {
    let mut t = Vec::new();
    put_int(&mut t, 1, values.len() as u64);
    put_int(&mut t, 2, FLOAT);
    put_bytes(&mut t, 8, name.as_bytes());
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    put_bytes(&mut t, 9, &raw);
    t
}

/// `-1` as ONNX stores a negative `int64` attribute.
const MINUS_ONE: u64 = u64::MAX;

/// Finds each exported self-attention block and records one
/// `com.microsoft.MultiHeadAttention` in its place (see the module documentation). Returns
/// the new initializers (the three projections' biases, concatenated per block). The block's
/// other nodes are left for [`live_nodes`] to drop once nothing reads them.
///
/// The block, as the exporter writes it (`x·W + b` is the projection, already a
/// `DynamicQuantizeMatMul` or still a `MatMul`):
///
/// ```text
/// q = Transpose[0,2,1,3](Reshape(xWq + bq, [B, S, -1, D]))        (and v alike)
/// k = Reshape(Transpose[0,2,1](Reshape(Transpose[0,2,1,3](Reshape(xWk + bk, ..)))))
///     or Transpose[0,2,3,1](Reshape(xWk + bk, [B, S, -1, D]))
/// p = Softmax(Mul(q, c1) · Mul(k, c2) + Where(padding, 0, -big))    (each Mul optional)
/// out = Reshape(Transpose[0,2,1,3](p' · v), [B, S, -1])            (p' = p, or p guarded)
/// ```
///
/// The fused node gets no mask: the int8 embedder runs one text per run
/// (`OnnxEmbedder::run`), so no key is ever padding and the mask term is zero. A term that
/// masks anything else (a causal mask compares positions with positions) is not matched:
/// see [`padding_only`].
fn fuse_attention(
    nodes: &[Node],
    links: &Links<'_>,
    inits: &HashMap<String, Initializer>,
    graph_inputs: &HashSet<String>,
    replace: &mut HashMap<usize, Vec<Vec<u8>>>,
    done: &mut Rewritten,
) -> Vec<Vec<u8>> {
    let producer = &links.producer;
    let made = |value: &str, op: &str| {
        producer
            .get(value)
            .copied()
            .filter(|&i| nodes[i].is(op) && nodes[i].outputs.len() == 1)
    };
    let sole_consumer = |value: &str| match links.readers(value) {
        [one] => Some(*one),
        _ => None,
    };
    let scalar = |name: &str| inits.get(name).and_then(|i| i.scalar);
    let perm = |i: usize, want: &[u64]| {
        let n = &nodes[i];
        n.lists.get("perm").is_some_and(|p| p == want) && n.lists.len() == 1 && n.ints.is_empty()
    };
    // `Add(x, b)` with `b` a 1-D float initializer: (x, b's values).
    let biased = |value: &str| {
        let add = &nodes[made(value, "Add")?];
        match add.inputs.as_slice() {
            [x, b] | [b, x] if inits.get(b).is_some_and(|i| i.dims.len() == 1) => {
                Some((x.clone(), inits[b].floats()?))
            }
            _ => None,
        }
    };
    // `Reshape(Add(x, b), Concat(_, _, [-1], [D]))`: (x, b, D).
    let split_heads = |value: &str| {
        let r = &nodes[made(value, "Reshape")?];
        let [data, shape] = r.inputs.as_slice() else {
            return None;
        };
        let c = &nodes[made(shape, "Concat")?];
        let [_, _, rest, head] = c.inputs.as_slice() else {
            return None;
        };
        let one = |name: &str| inits.get(name).and_then(Initializer::int64s);
        if one(rest)? != [-1] {
            return None;
        }
        let [head] = one(head)?[..] else { return None };
        let head = usize::try_from(head).ok().filter(|&h| h > 0)?;
        let (x, bias) = biased(data)?;
        Some((x, bias, head))
    };
    // `Transpose[0,2,1,3](split_heads)`: queries and values.
    let heads = |value: &str| {
        let t = made(value, "Transpose").filter(|&t| perm(t, &[0, 2, 1, 3]))?;
        split_heads(&nodes[t].inputs[0])
    };
    // Keys, transposed for the product (either exported form).
    let keys_t = |value: &str| {
        if let Some(t) = made(value, "Transpose").filter(|&t| perm(t, &[0, 2, 3, 1])) {
            return split_heads(&nodes[t].inputs[0]);
        }
        let outer = &nodes[made(value, "Reshape")?];
        let t = made(&outer.inputs[0], "Transpose").filter(|&t| perm(t, &[0, 2, 1]))?;
        let inner = &nodes[made(&nodes[t].inputs[0], "Reshape")?];
        heads(&inner.inputs[0])
    };
    // `Mul(x, c)` with `c` a positive float scalar: (x, c); anything else is (it, 1).
    let scaled = |value: &str| {
        let unscaled = (value.to_string(), 1.0f32);
        let Some(m) = made(value, "Mul") else {
            return unscaled;
        };
        match nodes[m].inputs.as_slice() {
            [x, c] | [c, x] if scalar(c).is_some_and(|c| c > 0.0) => {
                (x.clone(), scalar(c).unwrap_or(1.0))
            }
            _ => unscaled,
        }
    };

    let mut new_biases = Vec::new();
    for (s, sm) in nodes.iter().enumerate() {
        let axis_last = match sm.ints.get("axis") {
            None => true,
            Some(&a) => a == MINUS_ONE || a == 3,
        };
        if !(sm.is("Softmax") && axis_last && sm.inputs.len() == 1 && sm.outputs.len() == 1) {
            continue;
        }
        let fused = (|| {
            let add = &nodes[made(&sm.inputs[0], "Add")?];
            sole_consumer(&add.outputs[0]).filter(|&c| c == s)?;
            let (scores, mask) = match add.inputs.as_slice() {
                [a, b] if made(a, "MatMul").is_some() => (a, b),
                [b, a] if made(a, "MatMul").is_some() => (a, b),
                _ => return None,
            };
            let w = &nodes[made(mask, "Where")?];
            let [cond, zero, neg] = w.inputs.as_slice() else {
                return None;
            };
            let blocked = scalar(zero) == Some(0.0) && scalar(neg).is_some_and(|v| v <= -1e4);
            if !blocked || !padding_only(nodes, producer, inits, graph_inputs, cond) {
                return None;
            }
            let mm = &nodes[made(scores, "MatMul")?];
            let [qs, ks] = mm.inputs.as_slice() else {
                return None;
            };
            let ((q, c1), (k, c2)) = (scaled(qs), scaled(ks));
            let (q_in, q_bias, q_head) = heads(&q)?;
            let (k_in, k_bias, k_head) = keys_t(&k)?;
            // The probabilities, possibly through the NaN guard (Where(IsNaN(p), 0, p),
            // or the Identity it became), into `p · v`.
            let mut probs = sm.outputs[0].as_str();
            let mut pv = None;
            for _ in 0..2 {
                let uses = links.readers(probs);
                if let [one] = uses {
                    let n = &nodes[*one];
                    if n.is("MatMul") && n.inputs.len() == 2 && n.inputs[0] == probs {
                        pv = Some(*one);
                        break;
                    }
                }
                let guard = uses.iter().copied().find(|&u| {
                    let n = &nodes[u];
                    n.is("Where") && n.inputs.len() == 3 && n.inputs[2] == probs
                })?;
                let g = &nodes[guard];
                let isnan = made(&g.inputs[0], "IsNaN")?;
                let guarded = nodes[isnan].inputs == [probs.to_string()]
                    && scalar(&g.inputs[1]) == Some(0.0)
                    && uses.len() == 2
                    && uses.contains(&isnan);
                if !guarded {
                    return None;
                }
                probs = g.outputs[0].as_str();
            }
            let pv = &nodes[pv?];
            let (v_in, v_bias, v_head) = heads(&pv.inputs[1])?;
            let t = sole_consumer(&pv.outputs[0])
                .filter(|&t| nodes[t].is("Transpose") && perm(t, &[0, 2, 1, 3]))?;
            let out = sole_consumer(&nodes[t].outputs[0]).filter(|&r| nodes[r].is("Reshape"))?;
            let shape = &nodes[made(&nodes[out].inputs[1], "Concat")?];
            let [_, _, rest] = shape.inputs.as_slice() else {
                return None;
            };
            if inits.get(rest).and_then(Initializer::int64s)? != [-1] {
                return None;
            }
            let hidden = q_bias.len();
            let same = k_bias.len() == hidden
                && v_bias.len() == hidden
                && q_head == k_head
                && k_head == v_head
                && hidden % q_head == 0;
            if !same || replace.contains_key(&out) {
                return None;
            }
            let bias: Vec<f32> = [q_bias, k_bias, v_bias].concat();
            Some((out, q_in, k_in, v_in, bias, hidden / q_head, c1 * c2))
        })();
        let Some((out, q, k, v, bias, num_heads, scale)) = fused else {
            continue;
        };
        let name = format!("ragway_attention_{out}");
        let bias_name = format!("{name}_bias");
        let mha = node(
            &name,
            "MultiHeadAttention",
            "com.microsoft",
            &[&q, &k, &v, &bias_name],
            &[&nodes[out].outputs[0]],
            &[("num_heads", num_heads as u64)],
        );
        replace.insert(out, vec![with_float(mha, "scale", scale)]);
        new_biases.push(float_tensor(&bias_name, &bias));
        done.attentions += 1;
    }
    new_biases
}

/// Whether the mask condition `cond` only marks padding: computed from graph inputs through
/// shape and index operations, and compared only with constants (`0 <= position`). A causal
/// or windowed mask compares positions with positions (or subtracts them) and is refused.
fn padding_only(
    nodes: &[Node],
    producer: &HashMap<&str, usize>,
    inits: &HashMap<String, Initializer>,
    graph_inputs: &HashSet<String>,
    cond: &str,
) -> bool {
    const SHAPING: &[&str] = &[
        "And",
        "Cast",
        "Concat",
        "Expand",
        "Gather",
        "GatherND",
        "Identity",
        "Max",
        "Range",
        "Reshape",
        "Shape",
        "Slice",
        "Squeeze",
        "Unsqueeze",
    ];
    const COMPARE: &[&str] = &["Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual"];
    let mut seen = HashSet::new();
    let mut todo = vec![cond.to_string()];
    let mut reads_input = false;
    while let Some(value) = todo.pop() {
        if value.is_empty() || inits.contains_key(&value) || !seen.insert(value.clone()) {
            continue;
        }
        // A bound on the walk: the exported mask is ~30 nodes.
        if seen.len() > 256 {
            return false;
        }
        let Some(&i) = producer.get(value.as_str()) else {
            reads_input |= graph_inputs.contains(&value);
            continue;
        };
        let n = &nodes[i];
        if !n.domain.is_empty() {
            return false;
        }
        if COMPARE.contains(&n.op.as_str()) {
            if !n.inputs.iter().any(|x| inits.contains_key(x)) {
                return false;
            }
        } else if !SHAPING.contains(&n.op.as_str()) {
            return false;
        }
        todo.extend(n.inputs.iter().cloned());
    }
    reads_input
}

/// Which nodes still matter: those whose outputs reach the graph's outputs (nodes are in
/// topological order, as ONNX requires). `None` when a node has a subgraph, whose body may
/// read outer values without naming them.
fn live_nodes(nodes: &[&Node], graph_outputs: &HashSet<String>) -> Option<Vec<bool>> {
    if nodes.iter().any(|n| n.subgraph) {
        return None;
    }
    let mut needed: HashSet<&str> = graph_outputs.iter().map(String::as_str).collect();
    let mut live = vec![false; nodes.len()];
    for (i, n) in nodes.iter().enumerate().rev() {
        if n.outputs.iter().any(|o| needed.contains(o.as_str())) {
            live[i] = true;
            needed.extend(n.inputs.iter().map(String::as_str));
        }
    }
    Some(live)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, data_type: u64, dims: &[u64], data: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        for d in dims {
            put_int(&mut t, 1, *d);
        }
        put_int(&mut t, 2, data_type);
        put_bytes(&mut t, 8, name.as_bytes());
        put_bytes(&mut t, 9, data);
        t
    }

    fn value_info(name: &str) -> Vec<u8> {
        let mut v = Vec::new();
        put_bytes(&mut v, 1, name.as_bytes());
        v
    }

    /// A model in the layout of the shipped one: a vocabulary table looked up by `ids` and a
    /// matrix multiplied by `x`, both int8 with float scales.
    fn weight_only_model(scale_dims: &[u64]) -> Vec<u8> {
        let mut g = Vec::new();
        let nodes = [
            node(
                "c1",
                "Cast",
                "",
                &["table_q"],
                &["table_f"],
                &[("to", FLOAT)],
            ),
            node("m1", "Mul", "", &["table_f", "table_s"], &["table"], &[]),
            node("g", "Gather", "", &["table", "ids"], &["emb"], &[]),
            node("c2", "Cast", "", &["w_q"], &["w_f"], &[("to", FLOAT)]),
            node("m2", "Mul", "", &["w_s", "w_f"], &["w"], &[]),
            node("mm", "MatMul", "", &["x", "w"], &["y"], &[]),
        ];
        for n in &nodes {
            put_bytes(&mut g, 1, n);
        }
        put_bytes(&mut g, 2, b"tiny");
        put_bytes(&mut g, 5, &tensor("table_q", INT8, &[4, 3], &[1; 12]));
        put_bytes(&mut g, 5, &tensor("table_s", FLOAT, &[4, 1], &[0; 16]));
        put_bytes(&mut g, 5, &tensor("w_q", INT8, &[3, 2], &[2; 6]));
        put_bytes(&mut g, 5, &tensor("w_s", FLOAT, scale_dims, &[0; 8]));
        put_bytes(&mut g, 11, &value_info("ids"));
        put_bytes(&mut g, 11, &value_info("x"));
        put_bytes(&mut g, 12, &value_info("emb"));
        put_bytes(&mut g, 12, &value_info("y"));
        let mut m = Vec::new();
        put_int(&mut m, 1, 8);
        put_bytes(&mut m, 2, b"test");
        put_bytes(&mut m, 7, &g);
        let mut opset = Vec::new();
        put_int(&mut opset, 2, 17);
        put_bytes(&mut m, 8, &opset);
        m
    }

    fn graph_of(model: &[u8]) -> Vec<u8> {
        fields(model)
            .unwrap()
            .iter()
            .find(|f| f.number == 7)
            .unwrap()
            .bytes
            .to_vec()
    }

    #[test]
    fn rewrites_matmul_and_gather_onto_int8() {
        let (out, done) = rewrite(&weight_only_model(&[1, 2]))
            .unwrap()
            .expect("rewritten");
        assert_eq!(
            done,
            Rewritten {
                matmuls: 1,
                gathers: 1,
                ..Rewritten::default()
            }
        );
        let graph = graph_of(&out);
        let graph = fields(&graph).unwrap();
        let nodes: Vec<Node> = graph
            .iter()
            .filter(|f| f.number == 1)
            .map(|f| Node::parse(f.bytes).unwrap())
            .collect();
        let ops: Vec<(&str, &str)> = nodes
            .iter()
            .map(|n| (n.op.as_str(), n.domain.as_str()))
            .collect();
        assert_eq!(
            ops,
            [
                ("Gather", ""),
                ("Gather", ""),
                ("Cast", ""),
                ("Mul", ""),
                ("DynamicQuantizeMatMul", "com.microsoft")
            ]
        );
        // Looked-up int8 rows, their scales, converted with the same arithmetic as before.
        assert_eq!(nodes[0].inputs, ["table_q", "ids"]);
        assert_eq!(nodes[1].inputs, ["table_s", "ids"]);
        assert_eq!(nodes[2].ints.get("to"), Some(&FLOAT));
        assert_eq!(nodes[3].outputs, ["emb"]);
        assert_eq!(nodes[4].inputs, ["x", "w_q", "w_s"]);
        assert_eq!(nodes[4].outputs, ["y"]);
        // The per-column scale becomes 1-D; everything else is copied.
        let inits: HashMap<String, Initializer> = graph
            .iter()
            .filter(|f| f.number == 5)
            .map(|f| parse_initializer(f.bytes).unwrap())
            .collect();
        assert_eq!(inits["w_s"].dims, [2]);
        assert_eq!(inits["table_s"].dims, [4, 1]);
        assert_eq!(inits.len(), 4);
        assert_eq!(
            graph
                .iter()
                .filter(|f| f.number == 11 || f.number == 12)
                .count(),
            4
        );
        let opsets: Vec<Vec<u8>> = fields(&out)
            .unwrap()
            .iter()
            .filter(|f| f.number == 8)
            .map(|f| f.bytes.to_vec())
            .collect();
        assert_eq!(opsets.len(), 2);
        assert!(opsets[1].windows(13).any(|w| w == b"com.microsoft"));
        // Rewriting the result again finds nothing left to do.
        assert!(rewrite(&out).unwrap().is_none());
    }

    #[test]
    fn leaves_other_layouts_alone() {
        // A per-tensor scale of another rank, or a weight used twice, is not the pattern.
        let (_, done) = rewrite(&weight_only_model(&[2, 1])).unwrap().unwrap();
        assert_eq!(
            done,
            Rewritten {
                matmuls: 0,
                gathers: 1,
                ..Rewritten::default()
            }
        );
        let mut model = Vec::new();
        let mut g = Vec::new();
        put_bytes(&mut g, 1, &node("a", "Relu", "", &["x"], &["y"], &[]));
        put_bytes(&mut model, 7, &g);
        assert!(rewrite(&model).unwrap().is_none());
    }

    fn scalar(name: &str, v: f32) -> Vec<u8> {
        tensor(name, FLOAT, &[], &v.to_le_bytes())
    }

    /// The exported attention and feed-forward pieces, once as exported and once with a
    /// constant or an input that breaks the pattern.
    fn guard_and_gelu_model(sqrt2: f32, guarded: &str) -> Vec<u8> {
        let mut g = Vec::new();
        let nodes = [
            node("sm", "Softmax", "", &["s"], &["p"], &[("axis", 3)]),
            node("nan", "IsNaN", "", &[guarded], &["bad"], &[]),
            node("w", "Where", "", &["bad", "zero", "p"], &["probs"], &[]),
            node("d", "Div", "", &["x", "sqrt2"], &["t"], &[]),
            node("e", "Erf", "", &["t"], &["erf"], &[]),
            node("a", "Add", "", &["erf", "one"], &["a1"], &[]),
            node("h", "Mul", "", &["half", "a1"], &["h1"], &[]),
            node("y", "Mul", "", &["x", "h1"], &["gelu"], &[]),
        ];
        for n in &nodes {
            put_bytes(&mut g, 1, n);
        }
        put_bytes(&mut g, 5, &scalar("zero", 0.0));
        put_bytes(&mut g, 5, &scalar("sqrt2", sqrt2));
        put_bytes(&mut g, 5, &scalar("one", 1.0));
        put_bytes(&mut g, 5, &scalar("half", 0.5));
        for i in ["s", "x", "q"] {
            put_bytes(&mut g, 11, &value_info(i));
        }
        put_bytes(&mut g, 12, &value_info("probs"));
        put_bytes(&mut g, 12, &value_info("gelu"));
        let mut m = Vec::new();
        put_bytes(&mut m, 7, &g);
        m
    }

    fn ops(model: &[u8]) -> Vec<(String, Vec<String>, Vec<String>)> {
        fields(&graph_of(model))
            .unwrap()
            .iter()
            .filter(|f| f.number == 1)
            .map(|f| Node::parse(f.bytes).unwrap())
            .map(|n| (n.op, n.inputs, n.outputs))
            .collect()
    }

    #[test]
    fn nan_guards_and_written_out_gelus_become_what_they_compute() {
        let (out, done) = rewrite(&guard_and_gelu_model(std::f32::consts::SQRT_2, "p"))
            .unwrap()
            .expect("rewritten");
        assert_eq!(
            done,
            Rewritten {
                nan_guards: 1,
                gelus: 1,
                ..Rewritten::default()
            }
        );
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_string()).collect::<Vec<_>>();
        assert_eq!(
            ops(&out),
            [
                ("Softmax".into(), s(&["s"]), s(&["p"])),
                ("Identity".into(), s(&["p"]), s(&["probs"])),
                ("Gelu".into(), s(&["x"]), s(&["gelu"])),
            ]
        );
        let opsets = fields(&out).unwrap();
        assert!(
            opsets
                .iter()
                .any(|f| f.number == 8 && f.bytes.windows(13).any(|w| w == b"com.microsoft"))
        );
        let inits: Vec<String> = fields(&graph_of(&out))
            .unwrap()
            .iter()
            .filter(|f| f.number == 5)
            .map(|f| parse_initializer(f.bytes).unwrap().0)
            .collect();
        assert!(
            inits.is_empty(),
            "constants only the replaced nodes read: {inits:?}"
        );
        assert!(rewrite(&out).unwrap().is_none(), "nothing left");
        // Another constant, or a guard on another tensor, is not the pattern.
        assert!(rewrite(&guard_and_gelu_model(1.5, "q")).unwrap().is_none());
    }

    /// On the shipped model (`scripts/fetch-model.sh`): every pattern is found, in all six
    /// layers. The vectors it then computes are checked against independent references in
    /// `tests/embed_onnx.rs`.
    #[test]
    fn the_shipped_model_is_rewritten_whole() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/all-MiniLM-L6-v2/model.onnx");
        let model = std::fs::read(&path).expect("run scripts/fetch-model.sh");
        let (_, done) = rewrite(&model).unwrap().expect("rewritten");
        assert_eq!(
            done,
            Rewritten {
                matmuls: 36,
                gathers: 2,
                nan_guards: 6,
                gelus: 6,
                attentions: 6,
            }
        );
    }

    fn with_list(mut node: Vec<u8>, name: &str, values: &[u64]) -> Vec<u8> {
        let mut a = Vec::new();
        put_bytes(&mut a, 1, name.as_bytes());
        for v in values {
            put_int(&mut a, 8, *v);
        }
        put_int(&mut a, 20, 7);
        put_bytes(&mut node, 5, &a);
        node
    }

    fn int64(name: &str, v: i64) -> Vec<u8> {
        tensor(name, INT64, &[1], &v.to_le_bytes())
    }

    fn floats(name: &str, values: &[f32]) -> Vec<u8> {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensor(name, FLOAT, &[values.len() as u64], &raw)
    }

    /// One self-attention block in the exporter's layout (hidden 4, two heads of 2), its
    /// mask computed by `mask_nodes` into `cond`.
    fn attention_model(mask_nodes: &[Vec<u8>]) -> Vec<u8> {
        let mut nodes = Vec::new();
        for (p, w) in [("q", "wq"), ("k", "wk"), ("v", "wv")] {
            nodes.push(node(
                &format!("{p}mm"),
                "MatMul",
                "",
                &["x", w],
                &[&format!("x{p}")],
                &[],
            ));
            nodes.push(node(
                &format!("{p}b"),
                "Add",
                "",
                &[&format!("x{p}"), &format!("b{p}")],
                &[&format!("l{p}")],
                &[],
            ));
            nodes.push(node(
                &format!("{p}r"),
                "Reshape",
                "",
                &[&format!("l{p}"), "shape4"],
                &[&format!("r{p}")],
                &[],
            ));
            let perm: &[u64] = if p == "k" {
                &[0, 2, 3, 1]
            } else {
                &[0, 2, 1, 3]
            };
            nodes.push(with_list(
                node(
                    &format!("{p}t"),
                    "Transpose",
                    "",
                    &[&format!("r{p}")],
                    &[&format!("t{p}")],
                    &[],
                ),
                "perm",
                perm,
            ));
        }
        nodes.push(node(
            "s4",
            "Concat",
            "",
            &["b", "s", "minus_one", "head"],
            &["shape4"],
            &[("axis", 0)],
        ));
        nodes.extend(mask_nodes.iter().cloned());
        nodes.extend([
            node("sq", "Mul", "", &["tq", "c"], &["sq"], &[]),
            node("sk", "Mul", "", &["c", "tk"], &["sk"], &[]),
            node("mm", "MatMul", "", &["sq", "sk"], &["scores"], &[]),
            node("mw", "Where", "", &["cond", "zero", "neg"], &["mterm"], &[]),
            node("ma", "Add", "", &["scores", "mterm"], &["masked"], &[]),
            node(
                "sm",
                "Softmax",
                "",
                &["masked"],
                &["p"],
                &[("axis", MINUS_ONE)],
            ),
            node("pv", "MatMul", "", &["p", "tv"], &["o"], &[]),
            with_list(
                node("ot", "Transpose", "", &["o"], &["ot"], &[]),
                "perm",
                &[0, 2, 1, 3],
            ),
            node(
                "s3",
                "Concat",
                "",
                &["b", "s", "minus_one"],
                &["shape3"],
                &[("axis", 0)],
            ),
            node("out", "Reshape", "", &["ot", "shape3"], &["y"], &[]),
        ]);
        let mut g = Vec::new();
        for n in &nodes {
            put_bytes(&mut g, 1, n);
        }
        put_bytes(&mut g, 5, &floats("bq", &[1.0, 2.0, 3.0, 4.0]));
        put_bytes(&mut g, 5, &floats("bk", &[5.0, 6.0, 7.0, 8.0]));
        put_bytes(&mut g, 5, &floats("bv", &[9.0, 10.0, 11.0, 12.0]));
        put_bytes(&mut g, 5, &int64("minus_one", -1));
        put_bytes(&mut g, 5, &int64("head", 2));
        put_bytes(&mut g, 5, &int64("zero_i", 0));
        put_bytes(&mut g, 5, &scalar("c", 0.5));
        put_bytes(&mut g, 5, &scalar("zero", 0.0));
        put_bytes(&mut g, 5, &scalar("neg", f32::MIN));
        for i in ["x", "wq", "wk", "wv", "b", "s", "attention_mask", "i", "j"] {
            put_bytes(&mut g, 11, &value_info(i));
        }
        put_bytes(&mut g, 12, &value_info("y"));
        let mut m = Vec::new();
        put_bytes(&mut m, 7, &g);
        m
    }

    #[test]
    fn a_padding_masked_attention_block_becomes_one_multi_head_attention() {
        // Padding: the mask input, compared with a constant only.
        let padding = [
            node("mc", "Cast", "", &["attention_mask"], &["m"], &[("to", 7)]),
            node("ge", "GreaterOrEqual", "", &["m", "zero_i"], &["keep"], &[]),
            node("and", "And", "", &["keep", "keep"], &["cond"], &[]),
        ];
        let (out, done) = rewrite(&attention_model(&padding))
            .unwrap()
            .expect("rewritten");
        assert_eq!(
            done,
            Rewritten {
                attentions: 1,
                ..Rewritten::default()
            }
        );
        let graph = graph_of(&out);
        let nodes: Vec<Node> = fields(&graph)
            .unwrap()
            .iter()
            .filter(|f| f.number == 1)
            .map(|f| Node::parse(f.bytes).unwrap())
            .collect();
        // The projections stay; reshapes, transposes, scaling, mask and softmax are gone.
        let ops: Vec<&str> = nodes.iter().map(|n| n.op.as_str()).collect();
        assert_eq!(
            ops,
            ["MatMul", "MatMul", "MatMul", "MultiHeadAttention"],
            "{ops:?}"
        );
        let mha = &nodes[3];
        assert_eq!(mha.domain, "com.microsoft");
        assert_eq!(mha.inputs[..3], ["xq", "xk", "xv"]);
        assert_eq!(mha.outputs, ["y"]);
        assert_eq!(mha.ints.get("num_heads"), Some(&2));
        // scale = 0.5 · 0.5, read back from the float attribute.
        let attribute = fields(&graph)
            .unwrap()
            .iter()
            .filter(|f| f.number == 1)
            .nth(3)
            .map(|f| {
                fields(f.bytes)
                    .unwrap()
                    .into_iter()
                    .filter(|a| a.number == 5)
                    .map(|a| a.bytes.to_vec())
                    .collect::<Vec<_>>()
            })
            .unwrap();
        let scale = attribute
            .iter()
            .find(|a| a.windows(5).any(|w| w == b"scale"))
            .and_then(|a| {
                fields(a)
                    .unwrap()
                    .iter()
                    .find(|f| f.number == 2)
                    .map(|f| f.bytes.to_vec())
            })
            .expect("a scale attribute");
        assert_eq!(f32::from_le_bytes(scale.try_into().unwrap()), 0.25);
        // One bias of q, k and v in that order; the constants nothing reads any more dropped.
        let inits: HashMap<String, Initializer> = fields(&graph)
            .unwrap()
            .iter()
            .filter(|f| f.number == 5)
            .map(|f| parse_initializer(f.bytes).unwrap())
            .collect();
        let mut names: Vec<&str> = inits.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, [mha.inputs[3].as_str()]);
        assert_eq!(
            inits[&mha.inputs[3]].floats().unwrap(),
            (1..=12).map(|v| v as f32).collect::<Vec<_>>()
        );
        assert!(rewrite(&out).unwrap().is_none(), "nothing left");
    }

    #[test]
    fn a_causal_or_unknown_mask_is_not_fused_away() {
        // Positions compared with positions: a causal mask, which one text per run does
        // not make zero.
        let causal = [node("le", "LessOrEqual", "", &["i", "j"], &["cond"], &[])];
        assert!(rewrite(&attention_model(&causal)).unwrap().is_none());
        // Positions subtracted, then compared with a constant: a window.
        let window = [
            node("d", "Sub", "", &["i", "j"], &["dist"], &[]),
            node(
                "ge",
                "GreaterOrEqual",
                "",
                &["dist", "zero_i"],
                &["cond"],
                &[],
            ),
        ];
        assert!(rewrite(&attention_model(&window)).unwrap().is_none());
        // A condition from no input at all (a constant pattern) is not padding either.
        let constant = [node("id", "Identity", "", &["zero_i"], &["cond"], &[])];
        assert!(rewrite(&attention_model(&constant)).unwrap().is_none());
    }

    /// The walk up a mask's inputs is bounded: a chain longer than any exported mask is
    /// refused rather than followed, while the same chain, short, is padding.
    #[test]
    fn the_mask_walk_is_bounded() {
        let chain = |len: usize| {
            (0..len)
                .map(|i| {
                    let input = if i == 0 {
                        "attention_mask".to_string()
                    } else {
                        format!("c{}", i - 1)
                    };
                    let output = if i + 1 == len {
                        "cond".to_string()
                    } else {
                        format!("c{i}")
                    };
                    node(
                        &format!("id{i}"),
                        "Identity",
                        "",
                        &[&input],
                        &[&output],
                        &[],
                    )
                })
                .collect::<Vec<_>>()
        };
        let (_, done) = rewrite(&attention_model(&chain(10))).unwrap().unwrap();
        assert_eq!(done.attentions, 1);
        assert!(rewrite(&attention_model(&chain(300))).unwrap().is_none());
    }

    #[test]
    fn malformed_bytes_are_an_error_not_a_panic() {
        let model = weight_only_model(&[1, 2]);
        for cut in [1, 7, model.len() / 2, model.len() - 1] {
            // Every prefix either fails cleanly or (cut between fields) parses.
            let _ = rewrite(&model[..cut]);
        }
        assert!(rewrite(b"").is_err(), "no graph");
        assert!(rewrite(&[0x3a, 0xff, 0xff]).is_err(), "length past the end");
        assert!(rewrite(&[0xff; 11]).is_err(), "varint too long");
        assert!(rewrite(&[0x3b]).is_err(), "wire type 3");
    }
}
