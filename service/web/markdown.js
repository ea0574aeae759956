// A small Markdown subset to HTML: headings, paragraphs, lists, fenced and inline code, bold,
// italics and http(s) links. Everything is HTML-escaped first, so model output cannot inject
// markup; a link's URL is escaped too and must be http(s).

const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => (
  { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

// Bidi overrides, embeddings and isolates reorder what follows them on the screen
// ("invoice\u202efdp.exe" reads "invoiceexe.pdf"): shown as U+FFFD, as the terminal client does.
// Right-to-left text itself is laid out by the browser (dir="auto" on each block).
const BIDI_CONTROLS = /[\u202a-\u202e\u2066-\u2069]/g;
export const clean = (text) => text.replace(BIDI_CONTROLS, "\ufffd");

// A link's URL: http(s), with balanced parentheses kept (Wikipedia's "Python_(language)").
const LINK = /\[([^\]\n]+)\]\((https?:\/\/(?:[^\s()]|\([^\s()]*\))+)\)/g;

function inline(text) {
  const kept = []; // code spans and links' URLs, put back last (no emphasis inside them)
  const keep = (html) => `\u0000${kept.push(html) - 1}\u0000`;
  let html = escapeHtml(text)
    .replace(/`([^`\n]+)`/g, (_, code) => keep(`<code>${code}</code>`))
    .replace(LINK, (_, label, url) => (
      `<a href="${keep(url)}" rel="noopener noreferrer" target="_blank">${label}</a>`));
  // Emphasis as CommonMark flanks it: "6 * 7 = 42, and 3 * 4" holds none (a "*" followed or
  // preceded by a space opens or closes nothing); inside a word it is ("the *n*th term").
  html = html
    .replace(/\*\*(?=\S)([^*\n]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>");
  return html.replace(/\u0000(\d+)\u0000/g, (_, i) => kept[Number(i)]);
}

const FENCE = /^(\s*)(```|~~~)/;

export function renderMarkdown(source) {
  const out = [];
  const lines = clean(source).replace(/\r\n?/g, "\n").split("\n");
  let paragraph = [];
  let list = null; // "ul" or "ol"
  const flush = () => {
    if (paragraph.length) out.push(`<p dir="auto">${paragraph.map(inline).join("<br>")}</p>`);
    paragraph = [];
    if (list) out.push(`</${list}>`);
    list = null;
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
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    const item = /^\s*(?:([-*+])|(\d+)[.)])\s+(.*)$/.exec(line);
    if (heading) {
      flush();
      out.push(`<h${heading[1].length} dir="auto">${inline(heading[2])}</h${heading[1].length}>`);
    } else if (item) {
      const kind = item[1] ? "ul" : "ol";
      if (paragraph.length || list !== kind) flush();
      if (!list) {
        // A numbered list split by blank lines or code blocks goes on with its numbers.
        const start = kind === "ol" ? Number(item[2]) : 1;
        out.push(kind === "ol" && start !== 1 && start < 1e9 ? `<ol start="${start}">` : `<${kind}>`);
        list = kind;
      }
      out.push(`<li dir="auto">${inline(item[3])}</li>`);
    } else if (!line.trim()) {
      flush();
    } else {
      if (list) flush();
      paragraph.push(line);
    }
  }
  flush();
  return out.join("");
}
