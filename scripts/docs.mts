// `npm run docs`: writes docs/configuration.md and .env.example from the table of variables
// (lib/variables.ts). test/variables.test.ts fails when either differs from what this writes.
// A script of its own, not a step of build.mjs: build runs at every `npm ci` (also in an
// installed copy), and generated files that are tracked belong to a commit, not to an install.
import fs from 'node:fs';
import path from 'node:path';
import { configurationMarkdown, envExample } from '../lib/variables.ts';

const root = path.resolve(import.meta.dirname, '..');
const outputs: [string, string][] = [
  ['docs/configuration.md', configurationMarkdown()],
  ['.env.example', envExample()],
];
for (const [file, text] of outputs) {
  const at = path.join(root, file);
  const before = fs.existsSync(at) ? fs.readFileSync(at, 'utf8') : undefined;
  fs.mkdirSync(path.dirname(at), { recursive: true });
  fs.writeFileSync(at, text);
  console.log(`${file}: ${before === text ? 'unchanged' : 'written'}`);
}
