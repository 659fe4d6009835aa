// Bundles each script (every *.mts here) into dist/NAME.mjs (esbuild, which tsx already brings). A bundle starts in
// a fraction of the time the TypeScript loader needs, which is most of an unchanged run. What is
// loaded lazily (the AWS SDK, zx, age) goes into chunks of its own (dist/chunks/), so `--help` and
// a usage error start without it. lib/launch.sh runs a bundle only while it is newer than every
// source; otherwise the .mts itself through tsx. Run by `npm ci` (prepare) and `npm run build`.
import { build } from 'esbuild';
import fs from 'node:fs';
import path from 'node:path';

const root = path.dirname(new URL(import.meta.url).pathname);
const scripts = fs.readdirSync(root).filter((f) => f.endsWith('.mts'));
fs.rmSync(path.join(root, 'dist'), { recursive: true, force: true }); // no chunk of an older build
const common = {
  bundle: true,
  platform: 'node',
  format: 'esm',
  target: 'node20',
  // Its binary cannot be bundled; restore-verda loads it on Mello only (lib/restore-models.ts scriptBundle).
  external: ['esbuild'],
  // CommonJS dependencies inside an ES module bundle still call require() for Node's builtins.
  banner: {
    js: "import { createRequire as __createRequire } from 'node:module'; const require = __createRequire(import.meta.url);",
  },
  logLevel: 'warning',
};
// restore-verda brings itself to a fresh Verda as one file: a bundle without chunks.
await build({
  ...common,
  entryPoints: [path.join(root, 'restore-verda.mts')],
  outfile: path.join(root, 'dist/single/restore-verda.mjs'),
});
await build({
  ...common,
  entryPoints: scripts.map((f) => path.join(root, f)),
  outdir: path.join(root, 'dist'),
  outExtension: { '.js': '.mjs' },
  splitting: true,
  chunkNames: 'chunks/[name]-[hash]',
});
console.log(`built ${scripts.map((f) => `dist/${f.replace(/\.mts$/, '.mjs')}`).join(', ')}`);
