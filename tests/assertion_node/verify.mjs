// Runs the README's Node example: node verify.mjs EXAMPLE_MODULE UPSTREAM ASSERTION...
// EXAMPLE_MODULE is the README's code block, written next to this file so that its
// `import ... from "jose"` resolves to this folder's node_modules. Prints one JSON line per
// assertion: {"ok": payload} or {"error": code}.
import { pathToFileURL } from "node:url";

const [example, upstream, ...assertions] = process.argv.slice(2);
const { gatewayIdentity } = await import(pathToFileURL(example).href);
for (const assertion of assertions) {
  try {
    console.log(JSON.stringify({ ok: await gatewayIdentity(assertion, upstream) }));
  } catch (error) {
    console.log(JSON.stringify({ error: error.code || error.name }));
  }
}
