//! A YAML node tree that remembers where every node starts, built from `yaml_rust2`'s event
//! parser. Only what a spec needs: mappings, sequences and scalars; aliases are rejected.

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Deepest nesting accepted (a spec needs about six levels).
pub const MAX_DEPTH: usize = 64;

/// One YAML node and its 1-based position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: NodeKind,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
}

/// What a node holds.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// A scalar as written; `plain` is false for quoted and block scalars (always strings).
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Key/value pairs in document order (duplicates kept: the validator reports them).
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// The scalar text, if this is a scalar.
    pub fn scalar(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// True for a plain `~`, `null` or empty scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, NodeKind::Scalar { text, plain: true }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// A short name of the node's kind, for messages.
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            NodeKind::Scalar { .. } if self.is_null() => "null",
            NodeKind::Scalar { .. } => "a scalar",
            NodeKind::Seq(_) => "a list",
            NodeKind::Map(_) => "a mapping",
        }
    }
}

/// A YAML syntax problem, at a 1-based position.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

fn pos(m: &Marker) -> (usize, usize) {
    (m.line().max(1), m.col() + 1)
}

enum Frame {
    Seq(Node, Vec<Node>),
    Map(Node, Vec<(Node, Node)>, Option<Node>),
}

/// Parses one YAML document into a node tree; `Ok(None)` for an empty document.
pub fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    // The parser is third-party code: never let a bug in it take the process down.
    match std::panic::catch_unwind(|| parse_inner(text)) {
        Ok(r) => r,
        Err(_) => Err(SyntaxError {
            line: 1,
            col: 1,
            message: "invalid YAML: the parser failed on this input".into(),
        }),
    }
}

fn parse_inner(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Node> = None;
    let mut documents = 0usize;
    loop {
        let (event, mark) = parser.next_token().map_err(|e| {
            let (line, col) = pos(e.marker());
            SyntaxError {
                line,
                col,
                message: format!("invalid YAML: {}", e.info()),
            }
        })?;
        let (line, col) = pos(&mark);
        let done = match event {
            Event::StreamEnd => break,
            Event::Nothing | Event::StreamStart | Event::DocumentEnd => None,
            Event::DocumentStart => {
                documents += 1;
                if documents > 1 {
                    return Err(SyntaxError {
                        line,
                        col,
                        message: "a spec is one YAML document; found a second one".into(),
                    });
                }
                None
            }
            Event::Alias(_) => {
                return Err(SyntaxError {
                    line,
                    col,
                    message: "YAML aliases (`*name`) are not supported; write the value out".into(),
                })
            }
            Event::Scalar(text, style, _, tag) => {
                let plain =
                    style == TScalarStyle::Plain && tag.as_ref().is_none_or(|t| t.suffix != "str");
                Some(Node {
                    kind: NodeKind::Scalar { text, plain },
                    line,
                    col,
                })
            }
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(SyntaxError {
                        line,
                        col,
                        message: format!("nesting deeper than {MAX_DEPTH} levels"),
                    });
                }
                let node = Node {
                    kind: NodeKind::Seq(Vec::new()),
                    line,
                    col,
                };
                stack.push(if matches!(event, Event::SequenceStart(..)) {
                    Frame::Seq(node, Vec::new())
                } else {
                    Frame::Map(node, Vec::new(), None)
                });
                None
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Frame::Seq(mut node, items)) => {
                    node.kind = NodeKind::Seq(items);
                    Some(node)
                }
                Some(Frame::Map(mut node, pairs, _)) => {
                    // A block mapping's start mark lies after its first key: point at that key.
                    if let Some((k, _)) = pairs.first() {
                        if (k.line, k.col) < (node.line, node.col) {
                            (node.line, node.col) = (k.line, k.col);
                        }
                    }
                    node.kind = NodeKind::Map(pairs);
                    Some(node)
                }
                None => {
                    return Err(SyntaxError {
                        line,
                        col,
                        message: "invalid YAML: unbalanced collection".into(),
                    })
                }
            },
        };
        if let Some(node) = done {
            match stack.last_mut() {
                None => {
                    if root.is_some() {
                        return Err(SyntaxError {
                            line,
                            col,
                            message: "a spec is one YAML document; found a second one".into(),
                        });
                    }
                    root = Some(node);
                }
                Some(Frame::Seq(_, items)) => items.push(node),
                Some(Frame::Map(_, pairs, pending)) => match pending.take() {
                    None => *pending = Some(node),
                    Some(key) => pairs.push((key, node)),
                },
            }
        }
    }
    Ok(root.filter(|n| !n.is_null()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let n = parse("a: 1\nb:\n  - x\n  - 'y'\n").unwrap().unwrap();
        let NodeKind::Map(pairs) = &n.kind else {
            panic!("map")
        };
        assert_eq!((pairs[0].0.line, pairs[0].0.col), (1, 1));
        assert_eq!((pairs[0].1.line, pairs[0].1.col), (1, 4));
        let NodeKind::Seq(items) = &pairs[1].1.kind else {
            panic!("seq")
        };
        assert_eq!((items[1].line, items[1].col), (4, 5));
        assert_eq!(
            items[1].kind,
            NodeKind::Scalar {
                text: "y".into(),
                plain: false
            }
        );
    }

    #[test]
    fn errors_and_limits() {
        let e = parse("a: [1, 2\n").unwrap_err();
        assert!(e.message.starts_with("invalid YAML"), "{e:?}");
        let e = parse("a: &x 1\nb: *x\n").unwrap_err();
        assert!(e.message.contains("aliases"));
        let deep = "[".repeat(1000);
        assert!(parse(&deep).is_err());
        assert_eq!(parse("").unwrap(), None);
        assert!(parse("a: 1\n---\nb: 2\n").is_err());
    }
}
