// The one way our code runs on Verda: call and answer. Mello brings the Verda bundle
// (dist/verda.mjs, built by `npm run build` and by install) over the run's one connection with the
// request behind it on stdin (credentials never on a command line), and reads one JSON line back.
// Nothing needs to be installed on Verda but Node.js (a fresh Verda has no scripts), and the code
// Verda runs is always the code Mello runs. While it works, Verda's side reports its progress on
// stderr as `@progress` lines, which also tell Mello it is alive; stdin stays open, and Verda
// stops (and cleans up) when it closes: Mello is gone, or the link dropped.
import { setMaxListeners } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { exitAfterOutput, notices } from './cli.ts';
import { program } from './sh.ts';
import type { Host } from './ssh.ts';

/** The calls Verda answers (lib/verda.ts maps each to its work), and what each is for. */
const CALLS = {
  'backup-models': 'to send the models',
  'restore-models': 'to download the models',
  'restore-image': 'to download the worker image',
} as const;
export type RemoteCall = keyof typeof CALLS;

/** Where a long transfer stands: the whole, and the file that moved last. */
export interface Progress {
  bytes: number;
  /** The bytes of the work known so far (a listing grows as it goes). */
  total: number;
  file?: { key: string; bytes: number; size: number };
  /** The total is still growing. */
  counting?: boolean;
}

const PROGRESS = '@progress ';
/** How often Verda's side reports; a report is also Mello's sign of life (COMFYMULTI_COMMAND_TIMEOUT). */
const REPORT_MS = 1000;

/** Where the bundle is: dist/verda.mjs beside lib/ (from a bundle: the package above it). */
function bundleFile(): { file: string; lib?: string } {
  for (let dir = path.dirname(fileURLToPath(import.meta.url)); ; dir = path.dirname(dir)) {
    if (fs.existsSync(path.join(dir, 'dist'))) {
      const lib = path.join(dir, 'lib');
      return { file: path.join(dir, 'dist', 'verda.mjs'), lib: fs.existsSync(lib) ? lib : undefined };
    }
    if (dir === path.dirname(dir)) return { file: 'dist/verda.mjs' };
  }
}

/** The newest mtime of a TypeScript source under `dir`. */
function newestSource(dir: string): number {
  let newest = 0;
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) newest = Math.max(newest, newestSource(p));
    else if (e.name.endsWith('.ts')) newest = Math.max(newest, fs.statSync(p).mtimeMs);
  }
  return newest;
}

/** The Verda bundle, built and fresh: a missing or stale one is an error saying to rebuild. */
function verdaBundle(): Buffer {
  const { file, lib } = bundleFile();
  const st = fs.statSync(file, { throwIfNoEntry: false });
  if (!st?.isFile()) throw new Error(`${file} is missing: run \`npm run build\` in the scripts' directory`);
  if (lib && newestSource(lib) > st.mtimeMs)
    throw new Error(`${file} is older than the code in ${lib}: run \`npm run build\` in the scripts' directory`);
  return fs.readFileSync(file);
}

export interface Answer {
  error?: string;
  notices?: unknown;
  [field: string]: unknown;
}

/**
 * Runs `call` on Verda with `request`, and returns its answer (still data: the caller checks it).
 * A Verda without Node.js 20.15 is an error saying so; no answer at all is one naming why.
 */
export async function callVerda(
  host: Host,
  call: RemoteCall,
  request: object,
  opts: { signal: AbortSignal; onProgress?: (p: Progress) => void; onLine?: (line: string) => void },
): Promise<Answer> {
  const code = verdaBundle();
  const r = await host.$({
    input: Buffer.concat([code, Buffer.from(JSON.stringify({ call, request }) + '\n')]),
    holdStdin: true,
    signal: opts.signal,
    nothrow: true,
    onStderr: (line) => {
      if (!line.startsWith(PROGRESS)) return line && opts.onLine?.(line);
      try {
        opts.onProgress?.(JSON.parse(line.slice(PROGRESS.length)) as Progress);
      } catch {
        /* a cut line: the next one says it again */
      }
    },
  })`sh -c ${program('bring-and-run')} ${call} ${code.length}`;
  if (r.code === 126 || r.code === 127) {
    const found =
      r.code === 127 ? 'none on the PATH of a non-interactive SSH login' : r.stderr.trim().replace(/^node /, '');
    throw new Error(
      `Node.js 20.15 or newer is needed on ${host.label} ${CALLS[call]} (found: ${found}): install it there`,
    );
  }
  const last = r.stdout.trim().split('\n').pop() ?? '';
  try {
    const answer = JSON.parse(last) as unknown;
    if (answer && typeof answer === 'object' && !Array.isArray(answer)) return answer as Answer;
  } catch {
    /* not our output: it did not start, or the link went */
  }
  const lost = r.code === 255 && host.label !== 'local' ? 'the SSH connection was lost; ' : '';
  const lines = r.stderr
    .split('\n')
    .filter((l) => l && !l.startsWith(PROGRESS))
    .slice(-2);
  throw new Error(`${call} on ${host.label} failed (exit ${r.code}): ${lost}${lines.join('; ') || 'no answer'}`);
}

/** Verda's side of a call: what it reports as it goes. */
export type Report = (p: Progress) => void;

/**
 * Verda's side (lib/verda.ts): reads `{call, request}` from the first line of stdin, runs its
 * handler, prints the result as one JSON line with the run's notices; exit 1 when it names
 * failures, 2 when the request cannot be read. Stdin closing or a signal aborts the handler's
 * signal, so it stops and cleans up.
 */
export async function answerMello(
  handlers: Record<
    RemoteCall,
    (request: never, signal: AbortSignal, report: Report) => Promise<{ failures: unknown[] }>
  >,
): Promise<never> {
  const controller = new AbortController();
  // Every request in flight listens on it: many more than Node's warning threshold.
  setMaxListeners(0, controller.signal);
  // Mello gone: what is still said goes nowhere, and must not stop the clean-up.
  process.stdout.on('error', () => {});
  process.stderr.on('error', () => {});
  let buffered = '';
  const line = await new Promise<{ call: RemoteCall; request: never }>((resolve, reject) => {
    process.stdin.setEncoding('utf8');
    process.stdin.on('data', (chunk: string) => {
      buffered += chunk;
      const nl = buffered.indexOf('\n');
      if (nl < 0) return;
      try {
        resolve(JSON.parse(buffered.slice(0, nl)));
      } catch {
        reject(new Error('the request on stdin is not JSON'));
      }
    });
    process.stdin.on('end', () => {
      reject(new Error('no request on stdin'));
      controller.abort(new Error('Mello closed the connection'));
    });
  }).catch((e: Error) => {
    process.stdout.write(JSON.stringify({ error: e.message }) + '\n');
    return exitAfterOutput(2);
  });
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, () => controller.abort(new Error(sig)));
  const handler = handlers[line.call];
  if (!handler) {
    process.stdout.write(JSON.stringify({ error: `no such call: ${String(line.call).slice(0, 40)}` }) + '\n');
    return exitAfterOutput(2);
  }
  // The latest progress, said every REPORT_MS (and at least that often: Mello's sign of life).
  let latest: Progress = { bytes: 0, total: 0 };
  const say = () => process.stderr.write(`${PROGRESS}${JSON.stringify(latest)}\n`);
  const timer = setInterval(say, REPORT_MS);
  let code: number;
  try {
    const result = await handler(line.request, controller.signal, (p) => void (latest = p));
    say();
    process.stdout.write(JSON.stringify({ ...result, notices: [...notices] }) + '\n');
    code = result.failures.length ? 1 : 0;
  } catch (e) {
    process.stdout.write(JSON.stringify({ error: (e as Error).message, notices: [...notices] }) + '\n');
    code = 1;
  } finally {
    clearInterval(timer);
  }
  return exitAfterOutput(code);
}
