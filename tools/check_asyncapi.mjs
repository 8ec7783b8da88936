// Parse contracts/asyncapi.json with the official AsyncAPI parser and print what it finds.
// Exit 0: valid, no errors (warnings are printed); 1: errors; 2: cannot run.
// Run with `make check-asyncapi` (installs the parser into tools/node_modules first).
import { readFile } from "node:fs/promises";
import { Parser, DiagnosticSeverity } from "@asyncapi/parser";

const path = process.argv[2] ?? new URL("../contracts/asyncapi.json", import.meta.url);
let text;
try {
  text = await readFile(path, "utf8");
} catch (err) {
  console.error(`cannot read ${path}: ${err.message}`);
  process.exit(2);
}
const { document, diagnostics } = await new Parser().parse(text);
const name = { 0: "error", 1: "warning", 2: "info", 3: "hint" };
for (const d of diagnostics) {
  console.log(`${name[d.severity] ?? d.severity}: ${d.code}: ${d.message} at ${d.path.join(".") || "(root)"}`);
}
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
if (!document || errors.length) {
  console.log(`asyncapi: INVALID (${errors.length} errors)`);
  process.exit(1);
}
console.log(
  `asyncapi: valid AsyncAPI ${document.version()}: ${document.channels().length} channels, ` +
    `${document.operations().length} operations, ${document.components().messages().length} messages, ` +
    `${diagnostics.length - errors.length} warnings or hints`,
);
