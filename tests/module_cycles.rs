//! No import cycles between the modules of any crate in the workspace (issue 12, item 4).
//!
//! For every crate root of every workspace member (`src/lib.rs`, `src/main.rs`, `src/bin/*.rs`)
//! this builds the module dependency graph from the source text and fails, printing each cycle
//! with the file and line of every edge, if the graph has one:
//!
//! - a module is a file (`a.rs`, `a/mod.rs`, `a/b.rs`) or an inline `mod name { .. }`;
//! - module A depends on module B when A's code names a path into B: `use crate::b::..`,
//!   `crate::b::..`, `super::..`, `self::..`, a child module (`b::..`) or a module imported
//!   with `use` (`use crate::b; b::X`). A path is attributed to the module that defines the
//!   item: re-exports (`pub use x::Y`, `pub(crate) use`) are followed to their source, and
//!   are not themselves dependencies (a `mod.rs` that only re-exports its children depends on
//!   none of them);
//! - comments, doc comments and string literals are ignored.
//!
//! Run alone: `cargo test -p kemarid --test module_cycles` (docs/design.md). A target of the
//! kemarid package (kemarid/Cargo.toml `[[test]]`) because cross-crate tests live in `tests/`;
//! it reads the other crates' sources, it does not link them.

#![allow(clippy::unwrap_used)] // test code

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};

/// A module path from the crate root (`[]` is the root).
type ModPath = Vec<String>;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Semi,
    Star,
    Other,
}

/// Tokens of `src` with their line numbers; comments, strings and char literals are dropped.
fn tokenize(src: &str) -> Vec<(Tok, usize)> {
    let b: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if b[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('#') || next == Some('"')) && {
            let mut j = i + 1;
            while b.get(j) == Some(&'#') {
                j += 1;
            }
            b.get(j) == Some(&'"')
        } {
            // raw string r#"..."#
            let mut j = i + 1;
            let mut hashes = 0;
            while b[j] == '#' {
                hashes += 1;
                j += 1;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == '\n' {
                    line += 1;
                }
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            i = j;
            out.push((Tok::Other, line));
        } else if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    i += 1;
                }
                if b.get(i) == Some(&'\n') {
                    line += 1;
                }
                i += 1;
            }
            i += 1;
            out.push((Tok::Other, line));
        } else if c == '\'' {
            // a char literal ('x', '\n', '\u{..}') or a lifetime ('a)
            if next == Some('\\') {
                i += 2;
                while i < b.len() && b[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if b.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
                while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                    i += 1;
                }
            }
            out.push((Tok::Other, line));
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                i += 1;
            }
            let word: String = b[start..i].iter().collect();
            // b"..." and br"..." byte strings: let the string branch eat the literal
            if (word == "b" || word == "br") && matches!(b.get(i), Some('"') | Some('#')) {
                if word == "br" {
                    i -= 1; // back to 'r'
                }
                continue;
            }
            out.push((Tok::Ident(word), line));
        } else if c.is_ascii_digit() {
            while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_' || b[i] == '.') {
                if b[i] == '.' && !b.get(i + 1).is_some_and(|d| d.is_ascii_digit()) {
                    break;
                }
                i += 1;
            }
            out.push((Tok::Other, line));
        } else {
            let t = match c {
                ':' if next == Some(':') => {
                    i += 1;
                    Tok::PathSep
                }
                '{' => Tok::Open,
                '}' => Tok::Close,
                ',' => Tok::Comma,
                ';' => Tok::Semi,
                '*' => Tok::Star,
                _ => Tok::Other,
            };
            i += 1;
            out.push((t, line));
        }
    }
    out
}

/// One `use` leaf: the path as written (`self` as a last segment kept), the name it binds.
#[derive(Debug, Clone)]
struct UseLeaf {
    path: Vec<String>,
    bind: Option<String>,
}

/// Parses the use tree starting at `toks[*i]` (after `use`), up to the `;`.
fn parse_use_tree(toks: &[(Tok, usize)], i: &mut usize, prefix: &[String], out: &mut Vec<UseLeaf>) {
    let mut path = prefix.to_vec();
    loop {
        match toks.get(*i).map(|t| &t.0) {
            Some(Tok::Ident(w)) if w == "as" => {
                *i += 1;
                let bind = match toks.get(*i).map(|t| &t.0) {
                    Some(Tok::Ident(n)) => Some(n.clone()),
                    _ => None,
                };
                *i += 1;
                out.push(UseLeaf { path, bind });
                return;
            }
            Some(Tok::Ident(w)) => {
                path.push(w.clone());
                *i += 1;
            }
            Some(Tok::PathSep) => *i += 1,
            Some(Tok::Star) => {
                *i += 1;
                path.push("*".to_string());
                out.push(UseLeaf { path, bind: None });
                return;
            }
            Some(Tok::Open) => {
                *i += 1;
                loop {
                    match toks.get(*i).map(|t| &t.0) {
                        Some(Tok::Close) => {
                            *i += 1;
                            return;
                        }
                        Some(Tok::Comma) => *i += 1,
                        None => return,
                        _ => parse_use_tree(toks, i, &path, out),
                    }
                }
            }
            _ => {
                if path.len() > prefix.len() {
                    let bind = path.last().cloned();
                    out.push(UseLeaf { path, bind });
                }
                return;
            }
        }
    }
}

/// What one module's source says: its `use` leaves (private and re-exported) and other paths.
#[derive(Debug, Default)]
struct ModSource {
    file: String,
    uses: Vec<(UseLeaf, usize)>,
    reexports: Vec<UseLeaf>,
    paths: Vec<(Vec<String>, usize)>,
}

/// Splits a file's tokens over the file's module and its inline modules.
fn scan_file(module: &ModPath, file: &str, src: &str, mods: &mut BTreeMap<ModPath, ModSource>) {
    let toks = tokenize(src);
    // (module, brace depth at which its body closes)
    let mut stack: Vec<(ModPath, usize)> = vec![(module.clone(), 0)];
    let mut depth = 0usize;
    let mut i = 0;
    mods.entry(module.clone()).or_default().file = file.to_string();
    while i < toks.len() {
        let here = stack.last().map(|s| s.0.clone()).unwrap_or_default();
        match &toks[i].0 {
            Tok::Open => {
                depth += 1;
                i += 1;
            }
            Tok::Close => {
                if stack.len() > 1 && stack.last().is_some_and(|s| s.1 == depth) {
                    stack.pop();
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            Tok::Ident(w) if w == "mod" => {
                if let (Some((Tok::Ident(name), _)), Some((Tok::Open, _))) =
                    (toks.get(i + 1), toks.get(i + 2))
                {
                    let mut m = here.clone();
                    m.push(name.clone());
                    mods.entry(m.clone()).or_default().file = file.to_string();
                    depth += 1;
                    stack.push((m, depth));
                    i += 3;
                } else {
                    i += 1;
                }
            }
            Tok::Ident(w) if w == "use" => {
                // `pub use`, `pub(crate) use`, `pub(in path) use`: a re-export
                let mut k = i;
                let mut public = false;
                while k > 0 {
                    k -= 1;
                    match &toks[k].0 {
                        Tok::Ident(p) if p == "pub" => {
                            public = true;
                            break;
                        }
                        Tok::Ident(p) if p == "crate" || p == "super" || p == "in" => {}
                        Tok::Other | Tok::PathSep => {} // the parentheses of pub(..)
                        _ => break,
                    }
                }
                let line = toks[i].1;
                i += 1;
                let mut leaves = Vec::new();
                parse_use_tree(&toks, &mut i, &[], &mut leaves);
                let ms = mods.entry(here.clone()).or_default();
                for l in leaves {
                    if public {
                        ms.reexports.push(l);
                    } else {
                        ms.uses.push((l, line));
                    }
                }
            }
            Tok::Ident(w) => {
                let after_sep = i > 0 && toks[i - 1].0 == Tok::PathSep;
                if !after_sep && toks.get(i + 1).map(|t| &t.0) == Some(&Tok::PathSep) {
                    let line = toks[i].1;
                    let mut path = vec![w.clone()];
                    let mut k = i + 1;
                    while toks.get(k).map(|t| &t.0) == Some(&Tok::PathSep) {
                        match toks.get(k + 1).map(|t| &t.0) {
                            Some(Tok::Ident(n)) => path.push(n.clone()),
                            _ => break,
                        }
                        k += 2;
                    }
                    mods.entry(here.clone())
                        .or_default()
                        .paths
                        .push((path, line));
                    i = k;
                } else {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
}

/// One crate: its modules and what each says.
struct Crate {
    name: String,
    mods: BTreeMap<ModPath, ModSource>,
}

impl Crate {
    fn from_sources(name: &str, files: &[(ModPath, String, String)]) -> Crate {
        let mut mods = BTreeMap::new();
        for (m, file, src) in files {
            scan_file(m, file, src, &mut mods);
        }
        Crate {
            name: name.to_string(),
            mods,
        }
    }

    fn is_mod(&self, m: &[String]) -> bool {
        self.mods.contains_key(m)
    }

    /// The first segments of `path` as written in module `here`, made absolute: the module
    /// they start from and the rest. `None` for a path outside the crate (another crate, a
    /// local item or variable).
    fn anchor(
        &self,
        here: &ModPath,
        aliases: &HashMap<String, ModPath>,
        path: &[String],
    ) -> Option<(ModPath, usize)> {
        let first = path.first()?;
        match first.as_str() {
            "crate" => Some((vec![], 1)),
            "self" => Some((here.clone(), 1)),
            "super" => {
                let mut m = here.clone();
                let mut k = 0;
                while path.get(k).map(String::as_str) == Some("super") {
                    m.pop();
                    k += 1;
                }
                Some((m, k))
            }
            _ => {
                let mut child = here.clone();
                child.push(first.clone());
                if self.is_mod(&child) {
                    Some((child, 1))
                } else {
                    aliases.get(first).map(|m| (m.clone(), 1))
                }
            }
        }
    }

    /// The module that defines what an absolute path (`module` + `rest`) names, following
    /// re-exports.
    fn resolve(&self, mut module: ModPath, rest: &[String], hops: usize) -> ModPath {
        let mut k = 0;
        while let Some(seg) = rest.get(k) {
            let mut child = module.clone();
            child.push(seg.clone());
            if self.is_mod(&child) {
                module = child;
                k += 1;
            } else {
                break;
            }
        }
        let Some(name) = rest.get(k) else {
            return module;
        };
        if hops > 8 || name == "self" || name == "*" {
            return module;
        }
        let Some(src) = self.mods.get(&module) else {
            return module;
        };
        for r in &src.reexports {
            let bound = r.bind.clone().or_else(|| r.path.last().cloned());
            let glob = r.path.last().map(String::as_str) == Some("*");
            if bound.as_deref() == Some(name.as_str()) || glob {
                if let Some((base, used)) = self.anchor(&module, &HashMap::new(), &r.path) {
                    let mut target_rest: Vec<String> = r.path[used..].to_vec();
                    if glob {
                        target_rest.pop();
                        target_rest.push(name.clone());
                    } else if target_rest.last().map(String::as_str) == Some("self") {
                        target_rest.pop();
                    }
                    let target = self.resolve(base, &target_rest, hops + 1);
                    if !glob || target != module {
                        return target;
                    }
                }
            }
        }
        module
    }

    /// Edges `from -> to` with the file and line of their first occurrence.
    fn edges(&self) -> BTreeMap<(ModPath, ModPath), String> {
        let mut edges = BTreeMap::new();
        for (here, src) in &self.mods {
            let mut aliases = HashMap::new();
            let add = |to: ModPath, line: usize, edges: &mut BTreeMap<_, _>| {
                if &to != here {
                    edges
                        .entry((here.clone(), to))
                        .or_insert_with(|| format!("{}:{line}", src.file));
                }
            };
            for (leaf, line) in &src.uses {
                let Some((base, used)) = self.anchor(here, &HashMap::new(), &leaf.path) else {
                    continue;
                };
                let mut rest = leaf.path[used..].to_vec();
                let is_self = rest.last().map(String::as_str) == Some("self");
                if is_self {
                    rest.pop();
                }
                let target = self.resolve(base, &rest, 0);
                let bind = if is_self {
                    rest.last().cloned().or(leaf.bind.clone())
                } else {
                    leaf.bind.clone()
                };
                let bind = if is_self {
                    leaf.bind.clone().filter(|b| b != "self").or(bind)
                } else {
                    bind
                };
                if let Some(b) = bind {
                    let mut full = target.clone();
                    if !is_self {
                        if let Some(last) = rest.last() {
                            full.push(last.clone());
                        }
                    }
                    if self.is_mod(&full) {
                        aliases.insert(b, full);
                    } else if self.is_mod(&target) && (is_self || rest.is_empty()) {
                        aliases.insert(b, target.clone());
                    }
                }
                add(target, *line, &mut edges);
            }
            for (path, line) in &src.paths {
                let Some((base, used)) = self.anchor(here, &aliases, path) else {
                    continue;
                };
                let target = self.resolve(base, &path[used..], 0);
                add(target, *line, &mut edges);
            }
        }
        edges
    }

    /// Every cycle, as printable lines: between modules (files and inline modules), and between
    /// the trees of sibling modules (`sync` with everything under it against `xlsave`), so that
    /// `sync::sender -> xlsave -> sync::image` is a cycle between `sync` and `xlsave` even when no
    /// single file closes it.
    fn cycles(&self) -> Vec<String> {
        let edges = self.edges();
        let mut trees = BTreeMap::new();
        for ((from, to), at) in &edges {
            let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
            if from.len() > common && to.len() > common {
                trees
                    .entry((from[..=common].to_vec(), to[..=common].to_vec()))
                    .or_insert_with(|| at.clone());
            }
        }
        // a module and its own descendants may use each other (`super::Shared` in a child, a
        // child's function in the parent's impl): the tree they form is checked as one
        // against its siblings
        let across: BTreeMap<_, _> = edges
            .iter()
            .filter(|((from, to), _)| !from.starts_with(to) && !to.starts_with(from))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out = self.cycles_in(&across, "modules");
        for (members, line) in self.cycles_in(&trees, "module trees") {
            if !out.iter().any(|(m, _)| *m == members) {
                out.push((members, line));
            }
        }
        out.into_iter().map(|(_, line)| line).collect()
    }

    /// One cycle per strongly connected component of `edges`.
    fn cycles_in(
        &self,
        edges: &BTreeMap<(ModPath, ModPath), String>,
        kind: &str,
    ) -> Vec<(Vec<String>, String)> {
        let mut adj: BTreeMap<&ModPath, BTreeSet<&ModPath>> = BTreeMap::new();
        for (from, to) in edges.keys() {
            adj.entry(from).or_default().insert(to);
        }
        let name = |m: &ModPath| {
            if m.is_empty() {
                "crate".to_string()
            } else {
                m.join("::")
            }
        };
        let mut out = Vec::new();
        for comp in sccs(&adj) {
            if comp.len() < 2 {
                continue;
            }
            // the shortest cycle through the component's first node
            let start = comp[0];
            let inside: BTreeSet<&ModPath> = comp.iter().copied().collect();
            let mut prev: HashMap<&ModPath, &ModPath> = HashMap::new();
            let mut queue = VecDeque::from([start]);
            let mut end = None;
            while let Some(n) = queue.pop_front() {
                for &m in adj.get(n).into_iter().flatten() {
                    if !inside.contains(m) {
                        continue;
                    }
                    if m == start {
                        end = Some(n);
                        break;
                    }
                    if !prev.contains_key(m) {
                        prev.insert(m, n);
                        queue.push_back(m);
                    }
                }
                if end.is_some() {
                    break;
                }
            }
            let mut cycle = vec![start];
            let mut n = end.unwrap_or(start);
            while n != start {
                cycle.push(n);
                n = prev[n];
            }
            cycle[1..].reverse();
            cycle.push(start);
            let mut line = format!("{} ({kind}): {}", self.name, name(cycle[0]));
            for w in cycle.windows(2) {
                let at = &edges[&(w[0].clone(), w[1].clone())];
                line.push_str(&format!(" -> {} ({at})", name(w[1])));
            }
            let members: Vec<String> = comp.iter().map(|m| name(m)).collect();
            line.push_str(&format!("\n    component: {}", members.join(", ")));
            out.push((members, line));
        }
        out
    }
}

/// Tarjan's strongly connected components.
fn sccs<'a>(adj: &BTreeMap<&'a ModPath, BTreeSet<&'a ModPath>>) -> Vec<Vec<&'a ModPath>> {
    struct St<'a> {
        index: HashMap<&'a ModPath, usize>,
        low: HashMap<&'a ModPath, usize>,
        on: BTreeSet<&'a ModPath>,
        stack: Vec<&'a ModPath>,
        out: Vec<Vec<&'a ModPath>>,
    }
    fn visit<'a>(
        v: &'a ModPath,
        adj: &BTreeMap<&'a ModPath, BTreeSet<&'a ModPath>>,
        st: &mut St<'a>,
    ) {
        let i = st.index.len();
        st.index.insert(v, i);
        st.low.insert(v, i);
        st.stack.push(v);
        st.on.insert(v);
        for &w in adj.get(v).into_iter().flatten() {
            if !st.index.contains_key(w) {
                visit(w, adj, st);
                let lw = st.low[w];
                let lv = st.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if st.on.contains(w) {
                let iw = st.index[w];
                let lv = st.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if st.low[v] == st.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = st.stack.pop() {
                st.on.remove(w);
                comp.push(w);
                if w == v {
                    break;
                }
            }
            comp.sort();
            st.out.push(comp);
        }
    }
    let mut st = St {
        index: HashMap::new(),
        low: HashMap::new(),
        on: BTreeSet::new(),
        stack: vec![],
        out: vec![],
    };
    for &v in adj.keys() {
        if !st.index.contains_key(v) {
            visit(v, adj, &mut st);
        }
    }
    st.out
}

/// The `.rs` files of the module tree under `dir`, with their module paths below `prefix`.
fn module_files(dir: &Path, prefix: &ModPath, skip: &[PathBuf], out: &mut Vec<(ModPath, PathBuf)>) {
    let mut entries: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => return,
    };
    entries.sort();
    for p in entries {
        if skip.contains(&p) {
            continue;
        }
        let stem = p.file_stem().unwrap().to_string_lossy().to_string();
        let mut m = prefix.clone();
        if p.is_dir() {
            m.push(stem);
            module_files(&p, &m, skip, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            if stem != "mod" {
                m.push(stem);
            }
            out.push((m, p));
        }
    }
}

/// The crates of a workspace member: the library and each binary, with their files.
fn member_crates(root: &Path, member: &str) -> Vec<(String, Vec<(ModPath, PathBuf)>)> {
    let src = root.join(member).join("src");
    let mut crates = Vec::new();
    let bin = src.join("bin");
    for (rootfile, name) in [
        ("lib.rs", member.to_string()),
        ("main.rs", format!("{member} (main.rs)")),
    ] {
        let f = src.join(rootfile);
        if f.exists() {
            let other = src.join(if rootfile == "lib.rs" {
                "main.rs"
            } else {
                "lib.rs"
            });
            let mut files = vec![(vec![], f.clone())];
            module_files(&src, &vec![], &[f, other, bin.clone()], &mut files);
            crates.push((name, files));
        }
    }
    if let Ok(rd) = std::fs::read_dir(&bin) {
        let mut bins: Vec<PathBuf> = rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "rs"))
            .collect();
        bins.sort();
        for b in bins {
            let stem = b.file_stem().unwrap().to_string_lossy().to_string();
            let mut files = vec![(vec![], b.clone())];
            module_files(&bin.join(&stem), &vec![], &[], &mut files);
            crates.push((format!("{member} (bin {stem})"), files));
        }
    }
    crates
}

fn workspace_members(root: &Path) -> Vec<String> {
    let toml = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let line = toml
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("workspace members");
    line.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn load(root: &Path, name: &str, files: &[(ModPath, PathBuf)]) -> Crate {
    let srcs: Vec<(ModPath, String, String)> = files
        .iter()
        .map(|(m, p)| {
            let rel = p.strip_prefix(root).unwrap_or(p).display().to_string();
            (m.clone(), rel, std::fs::read_to_string(p).unwrap())
        })
        .collect();
    Crate::from_sources(name, &srcs)
}

#[test]
fn no_module_cycles_in_any_workspace_crate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let mut cycles = Vec::new();
    let mut checked = 0;
    for member in workspace_members(&root) {
        for (name, files) in member_crates(&root, &member) {
            let c = load(&root, &name, &files);
            if std::env::var_os("KEMARI_MODULE_GRAPH").is_some() {
                for ((from, to), at) in c.edges() {
                    println!("{name}: {} -> {} ({at})", from.join("::"), to.join("::"));
                }
            }
            checked += c.mods.len();
            cycles.extend(c.cycles());
        }
    }
    assert!(
        checked > 50,
        "found only {checked} modules: is the workspace layout still src/?"
    );
    assert!(
        cycles.is_empty(),
        "import cycles between modules:\n{}",
        cycles.join("\n")
    );
}

// The checker itself, on small made-up crates.

fn crate_of(files: &[(&str, &str)]) -> Crate {
    let srcs: Vec<(ModPath, String, String)> = files
        .iter()
        .map(|(m, src)| {
            let path: ModPath = if m.is_empty() {
                vec![]
            } else {
                m.split("::").map(str::to_string).collect()
            };
            (path, format!("{m}.rs"), src.to_string())
        })
        .collect();
    Crate::from_sources("t", &srcs)
}

#[test]
fn checker_finds_a_cycle_through_use_and_inline_paths() {
    let c = crate_of(&[
        ("", "pub mod a; pub mod b; pub mod c;"),
        ("a", "use crate::b::Thing;\nfn f() {}"),
        ("b", "pub struct Thing;\nfn g() { crate::c::h() }"),
        ("c", "// crate::a::nothing in a comment\npub fn h() { let _ = \"crate::a::x\"; super::a::f() }"),
    ]);
    let cycles = c.cycles();
    assert_eq!(cycles.len(), 1, "{cycles:?}");
    assert!(
        cycles[0].starts_with("t (modules): a -> b (a.rs:1) -> c (b.rs:2) -> a (c.rs:2)"),
        "{}",
        cycles[0]
    );
}

#[test]
fn checker_follows_reexports_and_module_aliases() {
    // x re-exports y's item; z uses it through x and y uses z: a cycle y -> z -> y, not via x.
    let c = crate_of(&[
        ("", "mod x; mod z;"),
        (
            "x",
            "mod y;\npub use y::Item;\npub use self::y::Other as Renamed;",
        ),
        (
            "x::y",
            "pub struct Item; pub struct Other;\nfn f() { crate::z::g() }",
        ),
        (
            "z",
            "use crate::x::{self, Item};\npub fn g() {}\nfn k(_: x::Renamed) {}",
        ),
    ]);
    let edges = c.edges();
    let e = |a: &str, b: &str| {
        let p = |s: &str| -> ModPath { s.split("::").map(str::to_string).collect() };
        edges.contains_key(&(p(a), p(b)))
    };
    assert!(e("z", "x::y") && e("x::y", "z"), "{edges:?}");
    assert!(
        !e("x", "x::y"),
        "a re-export is not a dependency: {edges:?}"
    );
    // and the trees x and z form one too
    assert_eq!(c.cycles().len(), 2, "{:?}", c.cycles());
}

#[test]
fn checker_finds_a_cycle_between_module_trees() {
    // no file closes it: s::a -> t -> s::b
    let c = crate_of(&[
        ("", "mod s; mod t;"),
        ("s", "mod a; mod b;"),
        ("s::a", "fn f() { crate::t::g() }"),
        ("s::b", "pub fn h() {}"),
        ("t", "pub fn g() { crate::s::b::h() }"),
    ]);
    let cycles = c.cycles();
    assert_eq!(cycles.len(), 1, "{cycles:?}");
    assert!(
        cycles[0].starts_with("t (module trees): s -> t (s::a.rs:1) -> s (t.rs:1)"),
        "{}",
        cycles[0]
    );
}

#[test]
fn checker_accepts_children_using_their_parent() {
    let c = crate_of(&[
        ("", "pub mod s; pub use s::Error;"),
        (
            "s",
            "pub mod a; pub mod b; pub use a::A;\n#[derive(Debug)] pub struct Error;\nfn f() { a::g() }",
        ),
        (
            "s::a",
            "use super::Error;\npub struct A(Error, super::b::B);\npub fn g() {}",
        ),
        (
            "s::b",
            "pub struct B;\n#[cfg(test)] mod tests { use super::*; use crate::Error; }",
        ),
    ]);
    assert!(c.cycles().is_empty(), "{:?}", c.cycles());
}
