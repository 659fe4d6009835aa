// backup-cron's last step: backup-mello on Mello, over SSH, in MELLO_SCRIPTS_DIR. Mello's summary
// and failures are reported here; its other lines go to the log with -v.
import { Writable } from 'node:stream';
import { errorText } from './cli.ts';
import type { Limits } from './config.ts';
import type { Step } from './step.ts';
import { openHost, shellQuote } from './ssh.ts';

// The command line sent to Mello: `sh -c 'CODE' backup-mello.mts FLAGS`, the flags last, as
// plain words. Mello's shell runs CODE (cd MELLO_SCRIPTS_DIR && exec ./backup-mello.mts FLAGS;
// `~` is Mello's home, the user backup-cron logs in as, not root's on Verda, so it is expanded
// there). Where Verda's key is a forced command (install --mello-trigger-key), no shell reads
// the line: lib/mello-trigger.sh takes the words after the last `backup-mello.mts` as flags, from
// its allow-list, and runs the backup-mello.mts beside it.
const triggerCode = (dir: string) =>
  `d=${shellQuote(dir)}; case $d in '~') d=$HOME ;; '~/'*) d=$HOME/\${d#'~/'} ;; esac; cd -- "$d" && exec ./backup-mello.mts "$@"`;

/**
 * How long backup-mello may go without printing a line before this run gives up on it: it prints
 * a line per step, and a first upload of outputs can take hours; it bounds each of its own
 * requests, and ServerAlive notices a dead link.
 */
const TRIGGER_IDLE_LIMIT_MS = 6 * 3600_000;

/** Calls `each` with every complete line written to it, and the rest at the end. */
function lineSink(each: (line: string) => void) {
  let rest = '';
  const feed = (text: string) => {
    const lines = (rest + text).split('\n');
    rest = lines.pop() ?? '';
    lines.forEach(each);
  };
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      feed(chunk.toString());
      cb();
    },
  });
  return { stream, feed, flush: () => rest && each(rest) };
}

export function triggerMelloStep(o: {
  melloHost: string;
  /** MELLO_SCRIPTS_DIR as written (`~` means Mello's home: expanded there). */
  scriptsDir: string;
  flags: string[];
  sshConfig?: string;
  limits: Limits;
}): Step {
  const mello = `Mello (MELLO_HOST=${o.melloHost})`;
  return {
    name: 'Trigger backup-mello on Mello',
    moves: `${o.melloHost}: cd ${o.scriptsDir} && ./backup-mello.mts ${o.flags.join(' ')}`,
    async run(ctx) {
      if (ctx.dryRun)
        return { summary: `would run backup-mello.mts ${o.flags.join(' ')} in ${o.scriptsDir} on ${mello}` };
      let host;
      try {
        host = await openHost(o.melloHost, { configFile: o.sshConfig, sudo: [], signal: ctx.signal, limits: o.limits });
      } catch (e) {
        if (ctx.signal.aborted) throw e;
        throw new Error(`${mello} cannot be reached: ${errorText(e)}; the SFS copies above stand`);
      }
      const kept: string[] = []; // Mello's summary and failure lines
      const sink = lineSink((line) => {
        ctx.out.detail(`mello: ${line}`);
        if (/^\s*(✗|===)/.test(line)) kept.push(line.trim());
        if (kept.length > 20) kept.shift();
      });
      try {
        const r = await host.$({
          into: sink.stream,
          signal: ctx.signal,
          onStderr: (line) => sink.feed(`${line}\n`),
          idleTimeoutMs: TRIGGER_IDLE_LIMIT_MS,
        })`sh -c ${triggerCode(o.scriptsDir)} backup-mello.mts ${o.flags}`;
        sink.flush();
        const last = kept.filter((l) => l.startsWith('===')).pop();
        if (r.code === 0) return { summary: `backup-mello on ${o.melloHost}: ${last ?? 'done'}` };
        // 75: another run holds Mello's lock. It may be doing this job, or it may be stuck: this
        // run did not do its work, and says so (a lock held for days must not pass as "skipped").
        if (r.code === 75) {
          const held = r.stderr
            .trim()
            .split('\n')
            .filter((l) => l.includes('holds the lock'))
            .pop();
          return {
            summary: `backup-mello on ${o.melloHost} did not run: another run holds its lock`,
            failures: [`mello: ${held?.replace(/^backup-mello: /, '') ?? 'lock held (exit 75)'}`],
          };
        }
        const said = kept.filter((l) => l.startsWith('✗')).map((l) => l.replace(/^✗\s*/, ''));
        const why = said.length ? said : [r.stderr.trim().split('\n').pop() || 'no output'];
        return {
          summary: `backup-mello on ${o.melloHost} exited ${r.code}${r.code === 255 ? ' (SSH connection lost)' : ''}`,
          failures: why.map((l) => `mello: ${l}`),
        };
      } finally {
        await host.close();
      }
    },
  };
}
