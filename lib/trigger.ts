// backup-cron's last step: backup-mello on Mello, over SSH, in MELLO_SCRIPTS_DIR. Mello's summary
// and failures are reported here; its other lines go to the log with -v.
import { Writable } from 'node:stream';
import { errorText } from './cli.ts';
import type { Limits } from './config.ts';
import type { Step } from './step.ts';
import { program } from './sh.ts';
import { openHost, said } from './ssh.ts';

// The command line sent to Mello: `sh -c PROGRAM MELLO_SCRIPTS_DIR backup-mello.mts FLAGS`, the
// flags last, as plain words; lib/sh/trigger-mello.sh goes to the directory and runs the script.
// Where Verda's key is a forced command (install --mello-trigger-key), no shell reads the line:
// lib/mello-trigger.sh takes the words after the last `backup-mello.mts` as flags, from its
// allow-list, and runs the backup-mello.mts beside it.

/**
 * How long backup-mello may go without printing a line before this run gives up on it: it prints
 * a line per step, and a first upload of outputs can take hours; it bounds each of its own
 * requests, and ServerAlive notices a dead link.
 */
const TRIGGER_IDLE_LIMIT_MS = 6 * 3600_000;

/** lib/sh/trigger-mello.sh's exit when MELLO_SCRIPTS_DIR is not a directory on Mello. */
const NO_SCRIPTS_DIR = 66;

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
          nothrow: true,
        })`sh -c ${program('trigger-mello')} ${o.scriptsDir} backup-mello.mts ${o.flags}`;
        sink.flush();
        const last = kept.filter((l) => l.startsWith('===')).pop();
        if (r.code === NO_SCRIPTS_DIR && !last)
          throw new Error(`MELLO_SCRIPTS_DIR (${o.scriptsDir}) does not exist on ${o.melloHost}`);
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
        const failed = kept.filter((l) => l.startsWith('✗')).map((l) => l.replace(/^✗\s*/, ''));
        const why = failed.length ? failed : [said(r.stderr, 1)];
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
