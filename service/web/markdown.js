// A small Markdown subset to HTML: headings (ATX and setext), paragraphs, rules, lists (nested
// by indentation), tables, fenced and inline code, bold, italics, backslash escapes and http(s)
// links. Everything is HTML-escaped first, so model output cannot inject
// markup; a link's URL is escaped too and must be http(s).

const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => (
  { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

// Bidi overrides, embeddings and isolates reorder what follows them on the screen
// ("invoice\u202efdp.exe" reads "invoiceexe.pdf"): shown as U+FFFD, as the terminal client does.
// Right-to-left text itself is laid out by the browser (dir="auto" on each block).
const BIDI_CONTROLS = /[\u202a-\u202e\u2066-\u2069]/g;
export const clean = (text) => text.replace(BIDI_CONTROLS, "\ufffd");

// A backslash escape (CommonMark's: any ASCII punctuation), after HTML-escaping.
const ESCAPED = /\\(&(?:amp|lt|gt|quot|#39);|[!#$%()*+,\-./:;=?@[\\\]^_`{|}~])/g;

// A link's URL: http(s), with balanced parentheses kept (Wikipedia's "Python_(language)").
// Its text holds no "[": tried from every "[", a text that could scan past one took time
// growing with the square of a line of "[" (1.5 million froze the tab for 36 s).
const LINK = /\[([^[\]\n]+)\]\((https?:\/\/(?:[^\s()]|\([^\s()]*\))+)\)/g;
const PLACEHOLDER = /\u0000(\d+)\u0000/g;

// ``breaks``: a table cell's, where a line break is written <br> (GitHub's tables); the one
// tag taken as one, outside code spans.
function inline(text, breaks = false) {
  // Code spans and links' URLs, put back last (no emphasis inside them): each as its HTML and
  // as the (escaped) text it stood for, which is what a link's URL takes of it (a code span's
  // <code> was put inside the href: "[x](http://h/a`b`c)" led to /a%3Ccode%3Eb...).
  const kept = [];
  const keep = (html, source = html) => `\u0000${kept.push([html, source]) - 1}\u0000`;
  const asText = (part) => part.replace(PLACEHOLDER, (_, i) => asText(kept[Number(i)][1]));
  let html = escapeHtml(text)
    .replace(/`([^`\n]+)`/g, (span, code) => keep(`<code>${code}</code>`, span));
  if (breaks) html = html.replace(/&lt;br\s*\/?&gt;/gi, (tag) => keep("<br>", tag));
  html = html
    // A backslash before punctuation shows it as itself ("\*.txt": no emphasis, no backslash);
    // not in code spans (kept above). The escaped forms of & < > " ' count as one character.
    .replace(ESCAPED, (_, char) => keep(char))
    .replace(LINK, (_, label, url) => (
      `<a href="${keep(asText(url))}" rel="noopener noreferrer" target="_blank">${label}</a>`));
  // Emphasis as CommonMark flanks it: "6 * 7 = 42, and 3 * 4" holds none (a "*" followed or
  // preceded by a space opens or closes nothing); inside a word it is ("the *n*th term").
  html = html
    .replace(/\*\*(?=\S)([^*\n]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>");
  // (Put back until none is left: a kept part may hold others.)
  const restore = (part) => part.replace(PLACEHOLDER, (_, i) => restore(kept[Number(i)][0]));
  return restore(html);
}

const FENCE = /^(\s*)(```|~~~)/;
const ITEM = /^(\s*)(?:([-*+])|(\d+)[.)])\s+(.*)$/;

// A table row's cells: split at each "|" not escaped ("\|" is a pipe in a cell), the outer
// ones optional, as GitHub's tables.
function cells(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

// A delimiter row's cell: "---", ":--", "--:", ":-:" (checked cell by cell: a regex over the
// whole row backtracks for long runs of spaces, on every token).
const DELIMITER_CELL = /^:?-+:?$/;
const isDelimiter = (line) => /^[\s|:-]+$/.test(line) && line.includes("-")
  && cells(line).every((cell) => DELIMITER_CELL.test(cell));
const HEADING = /^(#{1,6})\s+(.*)$/;
// A rule ("---", "***", "___", spaced or not), and a setext heading's underline ("===", "---"
// under a paragraph's lines: that paragraph is the heading).
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const UNDERLINE = /^ {0,3}(=+|-+)[ \t]*$/;
// Cells a table makes up for its short rows, at most (as cmark-gfm: a wide header over many
// short rows would make width x rows of them, far more HTML than the text).
const FILLED_MAX = 10_000;

// A table (GitHub's): a header row, a delimiter row of as many cells ("---", ":--:"), then
// rows until a blank line, a line with no "|" or another block's start (an item, a heading,
// a fence). ``i``: the header's line. Null if not one.
function table(lines, i) {
  if (i + 1 >= lines.length || !lines[i].includes("|") || !isDelimiter(lines[i + 1])) return null;
  const head = cells(lines[i]);
  const align = cells(lines[i + 1]).map((d) => (
    d.startsWith(":") && d.endsWith(":") ? "center" : d.endsWith(":") ? "right" : d.startsWith(":") ? "left" : ""));
  if (align.length !== head.length) return null;
  const cell = (tag, text, col) => {
    const cls = align[col] ? ` class="align-${align[col]}"` : "";
    return `<${tag}${cls} dir="auto">${inline(text ?? "", true)}</${tag}>`;
  };
  const rows = [];
  let filled = 0;
  let end = i + 2;
  for (; end < lines.length; end++) {
    const line = lines[end];
    if (!line.trim() || !line.includes("|") || ITEM.test(line) || HEADING.test(line) || FENCE.test(line)) break;
    const row = cells(line).slice(0, head.length);
    const width = filled < FILLED_MAX ? head.length : row.length;
    filled += width - row.length;
    rows.push(`<tr>${Array.from({ length: width }, (_, col) => cell("td", row[col], col)).join("")}</tr>`);
  }
  const html = `<div class="table"><table><thead><tr>${head.map((h, col) => cell("th", h, col)).join("")}`
    + `</tr></thead>${rows.length ? `<tbody>${rows.join("")}</tbody>` : ""}</table></div>`;
  return { html, next: end };
}

export function renderMarkdown(source) {
  const out = [];
  // (NUL marks what inline() keeps aside: none may come from the text itself.)
  const lines = clean(source).replace(/\u0000/g, "\ufffd").replace(/\r\n?/g, "\n").split("\n");
  let paragraph = [];
  // The open lists, outermost first: each its kind ("ul" or "ol") and its items' indentation;
  // the innermost's last item is still open (a deeper item nests in it).
  const lists = [];
  const closeLists = (depth = 0) => {
    while (lists.length > depth) out.push(`</li></${lists.pop().kind}>`);
  };
  const flush = () => {
    if (paragraph.length) out.push(`<p dir="auto">${paragraph.map(inline).join("<br>")}</p>`);
    paragraph = [];
    closeLists();
  };
  const openList = (kind, indent, number) => {
    // A numbered list split by blank lines or code blocks goes on with its numbers.
    const start = kind === "ol" ? Number(number) : 1;
    out.push(kind === "ol" && start !== 1 && start < 1e9 ? `<ol start="${start}">` : `<${kind}>`);
    lists.push({ kind, indent });
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = FENCE.exec(line);
    if (fence) {
      // Indented too (a code block under a list item): its lines lose that indentation.
      flush();
      const [, indent, marker] = fence;
      const code = [];
      for (i++; i < lines.length && !lines[i].trimStart().startsWith(marker); i++) {
        const codeLine = lines[i];
        code.push(codeLine.startsWith(indent) ? codeLine.slice(indent.length) : codeLine.trimStart());
      }
      out.push(`<pre><code>${escapeHtml(code.join("\n"))}</code></pre>`);
      continue;
    }
    const underline = paragraph.length && !lists.length ? UNDERLINE.exec(line) : null;
    if (underline) {
      const level = underline[1][0] === "=" ? 1 : 2;
      out.push(`<h${level} dir="auto">${paragraph.map(inline).join("<br>")}</h${level}>`);
      paragraph = [];
      continue;
    }
    if (RULE.test(line)) {
      flush();
      out.push("<hr>");
      continue;
    }
    const heading = HEADING.exec(line);
    const item = ITEM.exec(line);
    const grid = !heading && !item ? table(lines, i) : null;
    if (heading) {
      flush();
      out.push(`<h${heading[1].length} dir="auto">${inline(heading[2])}</h${heading[1].length}>`);
    } else if (grid) {
      // Indented under an item: inside it (as GitHub shows it); else a block of its own.
      if (!(lists.length && /^\s/.test(line))) flush();
      out.push(grid.html);
      i = grid.next - 1;
    } else if (item) {
      const [, lead, bullet, number, text] = item;
      const indent = lead.replace(/\t/g, "    ").length;
      const kind = bullet ? "ul" : "ol";
      if (paragraph.length) flush();
      // Back out of the lists this item is not inside (less indented than their items).
      let depth = lists.length;
      while (depth > 1 && indent < lists[depth - 1].indent) depth--;
      closeLists(depth);
      const top = lists[lists.length - 1];
      if (!top) openList(kind, indent, number);
      else if (indent >= top.indent + 2) openList(kind, indent, number); // nested in the open item
      else if (top.kind !== kind) { // the same level, another kind: a list of its own
        closeLists(lists.length - 1);
        openList(kind, indent, number);
      } else out.push("</li>");
      out.push(`<li dir="auto">${inline(text)}`);
    } else if (!line.trim()) {
      flush();
    } else if (lists.length && /^\s/.test(line)) {
      // An indented line under an item goes on with that item.
      out.push(`<br>${inline(line.trim())}`);
    } else {
      if (lists.length) flush();
      paragraph.push(line);
    }
  }
  flush();
  return out.join("");
}
