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
//! Anything that does not match exactly (other models, other layouts) is left as it is, so a
//! model without these patterns loads unchanged. The rewrite works on the protobuf wire
//! format directly: only the fields it needs are decoded, every other byte is copied.

use std::collections::{HashMap, HashSet};

/// ONNX `TensorProto.DataType` values used here.
const FLOAT: u64 = 1;
const INT8: u64 = 3;

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
    /// Other attributes than plain integers make a node unmatchable (kept unchanged).
    other_attributes: bool,
}

impl Node {
    fn parse(buf: &[u8]) -> Result<Self> {
        let mut node = Node {
            inputs: Vec::new(),
            outputs: Vec::new(),
            op: String::new(),
            domain: String::new(),
            ints: HashMap::new(),
            other_attributes: false,
        };
        for f in fields(buf)? {
            match (f.number, f.wire) {
                (1, 2) => node.inputs.push(text(&f)?),
                (2, 2) => node.outputs.push(text(&f)?),
                (4, 2) => node.op = text(&f)?,
                (7, 2) => node.domain = text(&f)?,
                (5, 2) => {
                    // AttributeProto: name (1), i (3), type (20; INT = 2).
                    let (mut name, mut value, mut ty) = (None, None, None);
                    for a in fields(f.bytes)? {
                        match (a.number, a.wire) {
                            (1, 2) => name = Some(text(&a)?),
                            (3, 0) => value = Some(a.varint),
                            (20, 0) => ty = Some(a.varint),
                            _ => {}
                        }
                    }
                    match (name, value, ty) {
                        (Some(name), Some(v), Some(2)) => {
                            node.ints.insert(name, v);
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
}

fn parse_initializer(buf: &[u8]) -> Result<(String, Initializer)> {
    let mut name = String::new();
    let mut init = Initializer {
        dims: Vec::new(),
        data_type: 0,
        scalar: None,
    };
    // Exactly four bytes: a single float (longer data is a tensor, not a scalar).
    let one_float = |b: &[u8]| <[u8; 4]>::try_from(b).ok().map(f32::from_le_bytes);
    let mut value = None;
    for f in fields(buf)? {
        match (f.number, f.wire) {
            (4 | 9, 2) | (4, 5) => value = one_float(f.bytes),
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
    let mut graph_outputs = HashSet::new();
    let mut graph_values = HashSet::new();
    for f in &graph {
        match (f.number, f.wire) {
            (1, 2) => nodes.push(Node::parse(f.bytes)?),
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
                    }
                    graph_values.insert(name);
                }
            }
            _ => {}
        }
    }
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for input in &n.inputs {
            consumers.entry(input.as_str()).or_default().push(i);
        }
    }
    let only_consumer = |value: &str| match consumers.get(value).map(Vec::as_slice) {
        Some([one]) if !graph_outputs.contains(value) => Some(*one),
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
        let scale_used_once = consumers.get(scale.as_str()).is_some_and(|c| c.len() == 1);
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
        &inits,
        &only_consumer,
        &mut replace,
        &mut removed,
        &mut done,
    );
    if done == Rewritten::default() {
        return Ok(None);
    }

    // Constants only the replaced nodes read (the GELU's √2, 1 and 0.5): left in, ONNX Runtime
    // would warn about each at every session load. Graph inputs and outputs are kept (older
    // models list initializers among the inputs).
    let mut used: HashSet<&str> = graph_values.iter().map(String::as_str).collect();
    for (i, n) in nodes.iter().enumerate() {
        if !removed.contains(&i) && !replace.contains_key(&i) {
            used.extend(n.inputs.iter().map(String::as_str));
        }
    }
    let new_nodes = replace
        .values()
        .flatten()
        .map(|n| Node::parse(n))
        .collect::<Result<Vec<_>>>()?;
    used.extend(
        new_nodes
            .iter()
            .flat_map(|n| n.inputs.iter().map(String::as_str)),
    );
    let orphaned: HashSet<&str> = removed
        .iter()
        .chain(replace.keys())
        .flat_map(|&i| nodes[i].inputs.iter().map(String::as_str))
        .filter(|name| inits.contains_key(*name) && !used.contains(name))
        .collect();

    let mut new_graph = Vec::with_capacity(graph_field.bytes.len());
    let mut index = 0;
    for f in &graph {
        match (f.number, f.wire) {
            (1, 2) => {
                if let Some(nodes) = replace.get(&index) {
                    for n in nodes {
                        put_bytes(&mut new_graph, 1, n);
                    }
                } else if !removed.contains(&index) {
                    new_graph.extend_from_slice(f.raw);
                }
                index += 1;
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
    if (done.matmuls > 0 || done.gelus > 0) && !has_ms_opset {
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
    inits: &HashMap<String, Initializer>,
    only_consumer: &dyn Fn(&str) -> Option<usize>,
    replace: &mut HashMap<usize, Vec<Vec<u8>>>,
    removed: &mut HashSet<usize>,
    done: &mut Rewritten,
) {
    let producer: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.as_str(), i)))
        .collect();
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
        n.is(op) && !n.other_attributes && n.ints.is_empty() && n.outputs.len() == 1
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
                gelus: 6
            }
        );
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
