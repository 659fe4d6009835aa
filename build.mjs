// Bundles each script into dist/NAME.mjs (esbuild). A bundle starts in a
// fraction of the time the TypeScript loader needs, which is most of an unchanged run. What is
// loaded lazily (the AWS SDK, zx, age) goes into chunks of its own (dist/chunks/), so `--help` and
// a usage error start without it. And dist/verda.mjs, one file with no chunks: the code Mello
// brings to Verda over the connection for the models (lib/remote.ts). lib/launch.sh runs a
// script's bundle only while it is newer than every source (the checkout's own runs fall back to
// tsx); the installed launchers run the bundles built at install. Run by `npm ci` (prepare),
// `npm run build` and ./install.
import { build } from 'esbuild';
import fs from 'node:fs';
import path from 'node:path';

const root = path.dirname(new URL(import.meta.url).pathname);
// The scripts, by name: a stray *.mts beside them (an experiment) is neither built nor installed.
const scripts = ['backup-verda.mts', 'backup-mello.mts', 'backup-cron.mts', 'restore-verda.mts', 'restore-mello.mts'];
fs.rmSync(path.join(root, 'dist'), { recursive: true, force: true }); // no chunk of an older build
const common = {
  bundle: true,
  platform: 'node',
  format: 'esm',
  target: 'node20',
  // CommonJS dependencies inside an ES module bundle still call require() for Node's builtins.
  banner: {
    js: "import { createRequire as __createRequire } from 'node:module'; const require = __createRequire(import.meta.url);",
  },
  logLevel: 'warning',
};
// What Mello brings to Verda: one file, without chunks.
await build({ ...common, entryPoints: [path.join(root, 'lib/verda.ts')], outfile: path.join(root, 'dist/verda.mjs') });
await build({
  ...common,
  entryPoints: scripts.map((f) => path.join(root, f)),
  outdir: path.join(root, 'dist'),
  outExtension: { '.js': '.mjs' },
  splitting: true,
  chunkNames: 'chunks/[name]-[hash]',
});
console.log(`built ${[...scripts.map((f) => `dist/${f.replace(/\.mts$/, '.mjs')}`), 'dist/verda.mjs'].join(', ')}`);
