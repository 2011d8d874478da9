//! The module graph has no circles.
//!
//! A module that imports from a sibling which imports back (directly or around a longer
//! ring) can only be read, tested and changed together with it: the layering the
//! README's architecture section describes stops being true without anyone noticing.
//! This test parses `src/` with `syn`, follows the `mod` tree from `lib.rs`, resolves
//! every `crate::`, `super::`, `self::` and child-module path to the module it names,
//! and fails on any strongly connected set of modules, printing one reference site per
//! edge of the circle.
//!
//! What counts: for a reference from module A to module B, take their nearest common
//! ancestor L; the edge is between L's two children that hold A and B. So `proxy::admit`
//! using `limiter::Bucket` is an edge `proxy → limiter`, and a circle between two files
//! of `limiter/` is a circle among `limiter`'s children. A module and its own ancestors
//! are a namespace and its contents, not two layers: a child may name items of its
//! parent's `mod.rs`, but the parent's `mod.rs` counts as a node of its own (`L (mod.rs)`)
//! so a `mod.rs` that uses a child which uses it back is a circle too. Test-only code
//! (`#[cfg(test)]`, loom models) is left out: tests may reach across layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// A module's path from the crate root (`["limiter", "bucket"]`).
type ModPath = Vec<String>;

/// A node of the graph: a module, or the own items of a module with children.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Node {
    Module(ModPath),
    OwnItems(ModPath),
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::Module(p) if p.is_empty() => f.write_str("crate"),
            Node::Module(p) => f.write_str(&p.join("::")),
            Node::OwnItems(p) if p.is_empty() => f.write_str("crate (lib.rs)"),
            Node::OwnItems(p) => write!(f, "{} (mod.rs)", p.join("::")),
        }
    }
}

/// One parsed module: where it lives and what it names.
struct Module {
    file: PathBuf,
    /// Paths it mentions, as written, with the line they are on.
    refs: Vec<(Vec<String>, usize)>,
}

#[derive(Default)]
struct Crate {
    modules: BTreeMap<ModPath, Module>,
}

fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| requires_test_build(&m))
    })
}

/// Whether a `cfg` predicate holds only in a test build (`test`, or the loom models'
/// `sidecar_loom`): `all(test, not(sidecar_loom))` does, `any(test, feature = "x")` and
/// `not(test)` do not.
fn requires_test_build(meta: &syn::Meta) -> bool {
    use syn::punctuated::Punctuated;
    match meta {
        syn::Meta::Path(p) => p.is_ident("test") || p.is_ident("sidecar_loom"),
        syn::Meta::NameValue(_) => false,
        syn::Meta::List(list) => {
            let Ok(args) =
                list.parse_args_with(Punctuated::<syn::Meta, syn::Token![,]>::parse_terminated)
            else {
                return false;
            };
            if list.path.is_ident("all") {
                args.iter().any(requires_test_build)
            } else if list.path.is_ident("any") {
                !args.is_empty() && args.iter().all(requires_test_build)
            } else {
                false // `not(...)` and anything else
            }
        }
    }
}

/// Collects the paths one module mentions, skipping test-only items and nested modules
/// (those are modules of their own).
struct Refs<'a> {
    out: &'a mut Vec<(Vec<String>, usize)>,
}

impl Refs<'_> {
    fn push(&mut self, segments: Vec<String>, span: proc_macro2::Span) {
        self.out.push((segments, span.start().line));
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let mut s = prefix.clone();
                if n.ident != "self" {
                    s.push(n.ident.to_string());
                }
                self.push(s, n.ident.span());
            }
            syn::UseTree::Rename(r) => {
                let mut s = prefix.clone();
                if r.ident != "self" {
                    s.push(r.ident.to_string());
                }
                self.push(s, r.ident.span());
            }
            syn::UseTree::Glob(g) => self.push(prefix.clone(), g.star_token.spans[0]),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Refs<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs: &[syn::Attribute] = match item {
            syn::Item::Const(i) => &i.attrs,
            syn::Item::Enum(i) => &i.attrs,
            syn::Item::Fn(i) => &i.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Mod(_) => return, // a module of its own, parsed separately
            syn::Item::Static(i) => &i.attrs,
            syn::Item::Struct(i) => &i.attrs,
            syn::Item::Trait(i) => &i.attrs,
            syn::Item::Type(i) => &i.attrs,
            syn::Item::Use(i) => &i.attrs,
            _ => &[],
        };
        if is_test_only(attrs) {
            return;
        }
        syn::visit::visit_item(self, item);
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_test_only(&f.attrs) {
            syn::visit::visit_impl_item_fn(self, f);
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &u.tree);
    }

    /// A macro's arguments are tokens, not syntax: `crate::`, `super::` and `self::`
    /// paths in them (`matches!(x, crate::a::B)`, a `tracing` field) are read as
    /// tokens.
    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.visit_path(&m.path);
        let mut tokens = Vec::new();
        flatten(m.tokens.clone(), &mut tokens);
        let mut i = 0;
        while i < tokens.len() {
            let proc_macro2::TokenTree::Ident(first) = &tokens[i] else {
                i += 1;
                continue;
            };
            let name = first.to_string();
            if !matches!(name.as_str(), "crate" | "super" | "self") {
                i += 1;
                continue;
            }
            let mut segments = vec![name];
            let mut j = i + 1;
            while let (
                Some(proc_macro2::TokenTree::Punct(a)),
                Some(proc_macro2::TokenTree::Punct(b)),
                Some(proc_macro2::TokenTree::Ident(next)),
            ) = (tokens.get(j), tokens.get(j + 1), tokens.get(j + 2))
            {
                if a.as_char() != ':' || b.as_char() != ':' {
                    break;
                }
                segments.push(next.to_string());
                j += 3;
            }
            if segments.len() > 1 {
                self.push(segments, first.span());
            }
            i = j;
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        if p.segments.len() > 1 {
            let s = p.segments.iter().map(|s| s.ident.to_string()).collect();
            self.push(s, p.segments[0].ident.span());
        }
        syn::visit::visit_path(self, p);
    }
}

impl Crate {
    fn load(src: &Path) -> Crate {
        let mut krate = Crate::default();
        let lib = src.join("lib.rs");
        let file = parse(&lib);
        krate.add(Vec::new(), &lib, &file.items, src);
        krate
    }

    /// Adds the module at `path` whose items are `items` (from `file`); `dir` is where
    /// its `mod x;` children live.
    fn add(&mut self, path: ModPath, file: &Path, items: &[syn::Item], dir: &Path) {
        let mut refs = Vec::new();
        let mut visitor = Refs { out: &mut refs };
        for item in items {
            visitor.visit_item(item);
        }
        self.modules.insert(
            path.clone(),
            Module {
                file: file.to_path_buf(),
                refs,
            },
        );
        for item in items {
            let syn::Item::Mod(m) = item else { continue };
            if is_test_only(&m.attrs) {
                continue;
            }
            let name = m.ident.to_string();
            let mut child = path.clone();
            child.push(name.clone());
            match &m.content {
                Some((_, inline)) => self.add(child, file, inline, &dir.join(&name)),
                None => {
                    let flat = dir.join(format!("{name}.rs"));
                    let (child_file, child_dir) = if flat.exists() {
                        (flat, dir.join(&name))
                    } else {
                        (dir.join(&name).join("mod.rs"), dir.join(&name))
                    };
                    let parsed = parse(&child_file);
                    self.add(child, &child_file, &parsed.items, &child_dir);
                }
            }
        }
    }

    /// The module a path written in `from` names: the longest known module prefix.
    fn resolve(&self, from: &ModPath, segments: &[String]) -> Option<ModPath> {
        let (mut base, rest): (ModPath, &[String]) = match segments.first()?.as_str() {
            "crate" => (Vec::new(), &segments[1..]),
            "self" => (from.clone(), &segments[1..]),
            "super" => {
                let mut base = from.clone();
                let mut i = 0;
                while segments.get(i).map(String::as_str) == Some("super") {
                    base.pop();
                    i += 1;
                }
                (base, &segments[i..])
            }
            first => {
                let mut child = from.clone();
                child.push(first.to_string());
                if !self.modules.contains_key(&child) {
                    return None;
                }
                (from.clone(), segments)
            }
        };
        for s in rest {
            base.push(s.clone());
            if !self.modules.contains_key(&base) {
                base.pop();
                break;
            }
        }
        Some(base)
    }

    fn has_children(&self, path: &ModPath) -> bool {
        self.modules
            .keys()
            .any(|k| k.len() == path.len() + 1 && k.starts_with(path))
    }

    /// The edge a reference from `a` to `b` makes, if any (see the module doc).
    fn edge(&self, a: &ModPath, b: &ModPath) -> Option<(Node, Node)> {
        let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        let side = |m: &ModPath| {
            if m.len() == common {
                Node::OwnItems(m.clone())
            } else {
                Node::Module(m[..=common].to_vec())
            }
        };
        if a.len() == common && b.len() == common {
            return None; // the same module
        }
        if b.len() == common && !self.has_children(b) {
            return None;
        }
        Some((side(a), side(b)))
    }

    /// Every edge with the first place it is made (file and line).
    fn edges(&self, root: &Path) -> BTreeMap<(Node, Node), String> {
        let mut edges = BTreeMap::new();
        for (from, module) in &self.modules {
            for (segments, line) in &module.refs {
                let Some(to) = self.resolve(from, segments) else {
                    continue;
                };
                if let Some(edge) = self.edge(from, &to) {
                    let file = module.file.strip_prefix(root).unwrap_or(&module.file);
                    edges.entry(edge).or_insert_with(|| {
                        format!("{}:{line} `{}`", file.display(), segments.join("::"))
                    });
                }
            }
        }
        edges
    }
}

/// The tokens of a stream, groups opened (their delimiters dropped).
fn flatten(stream: proc_macro2::TokenStream, out: &mut Vec<proc_macro2::TokenTree>) {
    for t in stream {
        match t {
            proc_macro2::TokenTree::Group(g) => flatten(g.stream(), out),
            other => out.push(other),
        }
    }
}

fn parse(file: &Path) -> syn::File {
    let text = std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
    syn::parse_file(&text).unwrap_or_else(|e| panic!("cannot parse {}: {e}", file.display()))
}

/// Strongly connected sets of more than one node (Tarjan).
fn circles(edges: &BTreeMap<(Node, Node), String>) -> Vec<Vec<Node>> {
    let mut next: BTreeMap<&Node, Vec<&Node>> = BTreeMap::new();
    for (a, b) in edges.keys() {
        next.entry(a).or_default().push(b);
        next.entry(b).or_default();
    }
    struct State<'n> {
        index: BTreeMap<&'n Node, usize>,
        low: BTreeMap<&'n Node, usize>,
        stack: Vec<&'n Node>,
        on_stack: BTreeSet<&'n Node>,
        found: Vec<Vec<Node>>,
    }
    fn connect<'n>(v: &'n Node, next: &BTreeMap<&'n Node, Vec<&'n Node>>, s: &mut State<'n>) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        for &w in &next[v] {
            if !s.index.contains_key(w) {
                connect(w, next, s);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut set = Vec::new();
            loop {
                let w = s.stack.pop().expect("v is on the stack");
                s.on_stack.remove(w);
                set.push(w.clone());
                if w == v {
                    break;
                }
            }
            if set.len() > 1 {
                set.sort();
                s.found.push(set);
            }
        }
    }
    let mut state = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in next.keys() {
        if !state.index.contains_key(v) {
            connect(v, &next, &mut state);
        }
    }
    state.found
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let krate = Crate::load(&root.join("src"));
    assert!(
        krate.modules.len() > 50,
        "the mod tree was not followed: {} modules",
        krate.modules.len()
    );
    let edges = krate.edges(root);
    let found = circles(&edges);
    let mut report = String::new();
    for set in &found {
        let names: Vec<String> = set.iter().map(Node::to_string).collect();
        report.push_str(&format!(
            "\ncircle of {}: {}\n",
            set.len(),
            names.join(", ")
        ));
        for ((a, b), site) in &edges {
            if set.contains(a) && set.contains(b) {
                report.push_str(&format!("  {a} -> {b}   at {site}\n"));
            }
        }
    }
    assert!(
        found.is_empty(),
        "{} import circle(s) among src/ modules; break each by moving the shared piece \
         down a layer or passing it in (a trait, a closure, a value):{report}",
        found.len()
    );
}

#[test]
fn the_checker_sees_a_circle_it_is_shown() {
    let a = Node::Module(vec!["a".into()]);
    let b = Node::Module(vec!["b".into()]);
    let c = Node::Module(vec!["c".into()]);
    let mut edges = BTreeMap::new();
    edges.insert((a.clone(), b.clone()), String::new());
    edges.insert((b.clone(), c.clone()), String::new());
    assert!(circles(&edges).is_empty(), "a line is not a circle");
    edges.insert((c.clone(), a.clone()), String::new());
    assert_eq!(circles(&edges), vec![vec![a, b, c]]);
}

#[test]
fn paths_resolve_to_the_module_they_name() {
    let krate = Crate::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let p = |s: &str| -> ModPath { s.split("::").map(String::from).collect() };
    let limiter = p("limiter");
    assert_eq!(
        krate.resolve(&p("proxy"), &p("crate::limiter::Limiter")),
        Some(limiter.clone())
    );
    assert_eq!(
        krate.resolve(&p("limiter::bucket"), &p("super::Clock")),
        Some(limiter.clone())
    );
    assert_eq!(
        krate.resolve(&limiter, &p("bucket::Bucket")),
        Some(p("limiter::bucket"))
    );
    assert_eq!(krate.resolve(&limiter, &p("std::sync::Arc")), None);
    // proxy::admit → limiter is an edge between the crate's children proxy and limiter;
    // limiter::bucket → limiter's own items is an edge inside limiter.
    assert_eq!(
        krate.edge(&p("proxy::admit"), &limiter),
        Some((Node::Module(p("proxy")), Node::Module(limiter.clone())))
    );
    assert_eq!(
        krate.edge(&p("limiter::bucket"), &limiter),
        Some((
            Node::Module(p("limiter::bucket")),
            Node::OwnItems(limiter.clone())
        ))
    );
}

#[test]
fn paths_in_macro_arguments_and_outside_test_code_are_seen() {
    let file = syn::parse_file(
        "fn f() { let _ = matches!(x, crate::a::B); tracing::info!(v = %super::c::d()); }
         #[cfg(test)] fn t() { let _ = crate::e::F; }",
    )
    .unwrap();
    let mut refs = Vec::new();
    let mut visitor = Refs { out: &mut refs };
    for item in &file.items {
        visitor.visit_item(item);
    }
    let seen: Vec<String> = refs.iter().map(|(s, _)| s.join("::")).collect();
    assert!(seen.contains(&"crate::a::B".to_owned()), "{seen:?}");
    assert!(seen.contains(&"super::c::d".to_owned()), "{seen:?}");
    assert!(!seen.iter().any(|s| s.starts_with("crate::e")), "{seen:?}");
}

#[test]
fn only_code_built_for_tests_alone_counts_as_test_code() {
    let attrs = |src: &str| -> Vec<syn::Attribute> {
        syn::parse_str::<syn::ItemFn>(&format!("{src} fn f() {{}}"))
            .unwrap()
            .attrs
    };
    assert!(is_test_only(&attrs("#[cfg(test)]")));
    assert!(is_test_only(&attrs("#[cfg(all(test, not(sidecar_loom)))]")));
    assert!(is_test_only(&attrs("#[cfg(sidecar_loom)]")));
    assert!(!is_test_only(&attrs("#[cfg(not(test))]")));
    assert!(!is_test_only(&attrs("#[cfg(any(test, feature = \"x\"))]")));
    assert!(!is_test_only(&attrs("#[cfg(unix)]")));
    assert!(!is_test_only(&attrs("#[inline]")));
}
