// Running commands on the other machine: one OpenSSH connection per run (a ControlMaster
// socket in a private directory), every command over it; or, for a host named `local`, right
// here with no SSH at all.
//
// Commands read as zx's do, and this is the one way a command runs on a host:
// `await verda.$`${cli} image inspect --format {{.Id}} ${image}``, with zx's rules for `${}` (one
// argument each, a list spread, never split or parsed) and zx's result: a non-zero exit throws a
// CommandFailed quoting the last lines the command said, unless `nothrow`. Locally no shell is
// involved; the remote shell gets each argument single-quoted, so no name or value is ever parsed
// as code. A shell program of ours is a file of lib/sh/ (see sh.ts), given to `sh -c`, so that
// stdin stays free for data. Underneath is node's spawn, not zx's process: zx keeps every output
// chunk for a late pipe(), and an image save or a home archive is gigabytes streamed into a file.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Readable, Writable } from 'node:stream';
import { DEFAULT_LIMITS, type Limits } from './config.ts';
import { MiB } from './files.ts';

/** One argument for a POSIX shell (sh, dash, bash, zsh alike): single quotes, `'` as `'\''`. */
export function shellQuote(arg: string): string {
  return /^[A-Za-z0-9_\/.,:=@%+-]+$/.test(arg) ? arg : `'${arg.replace(/'/g, `'\\''`)}'`;
}

export interface RunOptions {
  /** Run it through the sudo command (VERDA_SUDO), for root-only paths. */
  sudo?: boolean;
  /** Given on its standard input (how secrets are passed: never on a command line). */
  input?: string | Buffer;
  /**
   * Streamed into its standard input instead, with backpressure (an archive unpacked there). Its
   * bytes moving count as activity for the idle timeout; a stream that fails stops the command,
   * and its error is the result.
   */
  stdin?: Readable;
  signal?: AbortSignal;
  /**
   * Where stderr lines go as they come (progress of a remote run), each line whole and at most
   * LINE_LIMIT bytes (a longer one is cut); stderr's tail is collected as well.
   */
  onStderr?: (line: string) => void;
  /**
   * Keep stdin open after `input` until the command ends: a remote command that watches its
   * stdin learns that this side is gone (interrupted, link dropped) and stops cleanly.
   */
  holdStdin?: boolean;
  /** Stop the command when it prints nothing for this long (default: the host's). */
  idleTimeoutMs?: number;
  /** Stream stdout into this (a multi-GB archive) instead of collecting it. */
  into?: Writable;
  /** Resolve whatever the exit status (zx's `nothrow`): the caller reads `code`. */
  nothrow?: boolean;
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** The last lines a command said on stderr, as one line: what a failure message quotes. */
export function said(stderr: string, lines = 3): string {
  return (
    stderr
      .trim()
      .split('\n')
      .map((l) => l.trim())
      .filter(Boolean)
      .slice(-lines)
      .join('; ') || 'no message'
  );
}

/** A command that exited with another status than 0 (and was not run `nothrow`). */
export class CommandFailed extends Error {
  constructor(
    readonly what: string,
    readonly result: RunResult,
  ) {
    super(`${what} failed (exit ${result.code}): ${said(result.stderr)}`);
  }
}

class HostError extends Error {
  /** Set on every error after the first for the same host: said once, not once per step. */
  repeat = false;
}

/** One `${}` of a command template: one argument, or a list of them. */
export type Arg = string | number | readonly (string | number)[];

/**
 * The argument list a command template stands for, by zx's rules: the literal text splits on
 * whitespace; each `${}` is one argument, a list is one argument per element, and neither is
 * ever split or parsed; text touching a `${}` joins it (`--directory=${dir}` is one argument).
 */
export function commandArgs(pieces: TemplateStringsArray, ...values: Arg[]): string[] {
  const args: string[] = [];
  let word: string | undefined; // the argument being built; undefined between arguments
  const end = () => {
    if (word !== undefined) args.push(word);
    word = undefined;
  };
  pieces.forEach((piece, i) => {
    for (const part of piece.split(/(\s+)/)) {
      if (/^\s+$/.test(part)) end();
      else if (part) word = (word ?? '') + part;
    }
    if (i >= values.length) return;
    const value = values[i];
    if (Array.isArray(value)) {
      value.forEach((v, j) => {
        if (j > 0) end();
        word = (word ?? '') + String(v);
      });
    } else word = (word ?? '') + String(value);
  });
  end();
  return args;
}

/** `host.$`cmd ${arg}`` runs it; `host.$({ sudo, signal, into })`cmd`` with options first. */
export interface CommandTemplate {
  (pieces: TemplateStringsArray, ...values: Arg[]): Promise<RunResult>;
  (opts: RunOptions): (pieces: TemplateStringsArray, ...values: Arg[]) => Promise<RunResult>;
}

/** What runs the commands of a host: spawn, or ssh over the run's connection. */
interface Executor {
  exec(argv: string[], opts: RunOptions): Promise<RunResult>;
  /** The command as the admin would read it, for messages. */
  describe(argv: string[]): string;
}

function templateOn(host: Executor): CommandTemplate {
  const run = async (argv: string[], opts: RunOptions) => {
    const r = await host.exec(argv, opts);
    if (r.code !== 0 && !opts.nothrow) throw new CommandFailed(host.describe(argv), r);
    return r;
  };
  return ((first: TemplateStringsArray | RunOptions, ...values: Arg[]) => {
    if (Array.isArray(first) && 'raw' in first) return run(commandArgs(first as TemplateStringsArray, ...values), {});
    return (pieces: TemplateStringsArray, ...rest: Arg[]) => run(commandArgs(pieces, ...rest), first as RunOptions);
  }) as CommandTemplate;
}

export interface Host {
  /** For messages: `verda (dev@verda)`, `local`. */
  readonly label: string;
  /** A command there, as a zx template: output captured (or streamed into `into`). */
  readonly $: CommandTemplate;
  /**
   * Over SSH: whether a new connection, checked against the admin's known_hosts alone, is accepted
   * (what restore-verda asks once the host keys are restored); undefined when it is, else why not.
   */
  checkHostKey?(): Promise<string | undefined>;
  close(): Promise<void>;
}

interface SpawnPlan {
  file: string;
  args: string[];
  /** The command as the admin would read it, for messages. */
  what: string;
}

/** A command that printed nothing for too long: stopped, so a run always ends by itself. */
export class CommandTimeout extends Error {}

/**
 * A command that printed more than OUTPUT_LIMIT on a stdout that is collected: stopped. What a
 * command on Verda prints is data from the least trusted machine: never held without a bound
 * (what is big by nature, archives and images, is streamed into a file instead).
 */
export class OutputTooLarge extends Error {}

/** The most of a command's stdout kept in memory. */
export const OUTPUT_LIMIT = 4 * MiB;
/** The most of its stderr kept: the last bytes, where the reason for a failure is. */
const STDERR_TAIL = 64 * 1024;
/** The longest stderr line handed on as it comes; the rest of it is cut. */
const LINE_LIMIT = 4096;

/** Splits a stream of text into lines of at most LINE_LIMIT, calling `onLine` for each whole one. */
function lineSplitter(onLine: (line: string) => void) {
  let partial = '';
  let cut = false;
  return {
    feed(text: string) {
      const lines = (partial + text).split('\n');
      partial = lines.pop()!;
      for (const line of lines) {
        if (!cut) onLine(line.length > LINE_LIMIT ? `${line.slice(0, LINE_LIMIT)}…` : line);
        cut = false;
      }
      if (partial.length > LINE_LIMIT) {
        if (!cut) onLine(`${partial.slice(0, LINE_LIMIT)}…`);
        partial = '';
        cut = true; // the rest of this line is dropped
      }
    },
    end() {
      if (partial && !cut) onLine(partial);
      partial = '';
    },
  };
}

/**
 * Spawns without a shell; stdout either collected or streamed; stderr collected (bounded). A
 * command silent for `idleTimeoutMs` (nothing on stdout or stderr) is stopped: SIGTERM, then
 * SIGKILL.
 */
function execute(plan: SpawnPlan, opts: RunOptions, idleTimeoutMs: number, into?: Writable): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    // Its own process group, so that stopping it stops what it started too (a shell's children).
    const child = spawn(plan.file, plan.args, { stdio: ['pipe', 'pipe', 'pipe'], detached: true });
    const stop = (sig: NodeJS.Signals) => {
      try {
        process.kill(-child.pid!, sig);
      } catch {
        child.kill(sig);
      }
    };
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    let tooMuch = false;
    const lines = opts.onStderr ? lineSplitter(opts.onStderr) : undefined;
    let idle: NodeJS.Timeout | undefined;
    const limit = opts.idleTimeoutMs ?? idleTimeoutMs;
    const quiet = () => {
      timedOut = true;
      stop('SIGTERM');
      setTimeout(() => child.exitCode === null && child.signalCode === null && stop('SIGKILL'), 2000).unref();
    };
    const onAbort = () => stop('SIGTERM');
    if (opts.signal?.aborted) onAbort();
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    const activity = () => {
      clearTimeout(idle);
      idle = setTimeout(quiet, limit);
    };
    activity();
    if (into) {
      child.stdout.on('data', activity);
      child.stdout.pipe(into, { end: false });
      into.once('error', (e) => {
        stop('SIGTERM');
        reject(e);
      });
    } else {
      child.stdout.setEncoding('utf8');
      child.stdout.on('data', (d: string) => {
        activity();
        if (tooMuch) return;
        if (stdout.length + d.length > OUTPUT_LIMIT) {
          tooMuch = true;
          stdout = '';
          stop('SIGTERM');
          setTimeout(() => child.exitCode === null && child.signalCode === null && stop('SIGKILL'), 2000).unref();
          return;
        }
        stdout += d;
      });
    }
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (text: string) => {
      activity();
      lines?.feed(text);
      stderr += text;
      if (stderr.length > 2 * STDERR_TAIL) stderr = stderr.slice(-STDERR_TAIL);
    });
    child.on('error', (e) => {
      clearTimeout(idle);
      opts.signal?.removeEventListener('abort', onAbort);
      opts.stdin?.destroy();
      reject(opts.signal?.aborted ? opts.signal.reason : e);
    });
    child.stdin.on('error', () => {}); // a command that does not read its input
    let stdinError: unknown;
    if (opts.stdin) {
      const source = opts.stdin;
      source.on('data', activity);
      // The command must not take a truncated stream for a whole one: it is stopped first.
      source.on('error', (e) => {
        stdinError ??= e;
        stop('SIGTERM');
        child.stdin.destroy();
      });
      source.pipe(child.stdin);
    } else if (opts.holdStdin) child.stdin.write(opts.input ?? '');
    else child.stdin.end(opts.input ?? '');
    child.on('close', (code, signal) => {
      clearTimeout(idle);
      opts.signal?.removeEventListener('abort', onAbort);
      // A command that ended before reading all of it: the rest is not read (its descriptor closed).
      if (opts.stdin && !opts.stdin.readableEnded) opts.stdin.destroy();
      lines?.end();
      if (stderr.length > STDERR_TAIL) stderr = stderr.slice(-STDERR_TAIL);
      if (opts.signal?.aborted) return reject(opts.signal.reason);
      if (stdinError !== undefined) return reject(stdinError);
      if (tooMuch) {
        return reject(new OutputTooLarge(`${plan.what}: printed more than ${OUTPUT_LIMIT / MiB} MiB: stopped`));
      }
      if (timedOut) {
        const s = Math.round(limit / 100) / 10;
        return reject(
          new CommandTimeout(`${plan.what}: nothing from it for ${s}s: stopped (COMFYMULTI_COMMAND_TIMEOUT)`),
        );
      }
      // ssh's own 255 with nothing said: the connection went away under the command.
      if (plan.file === 'ssh' && code === 255 && !stderr.trim()) stderr = 'the SSH connection was lost';
      resolve({ code: code ?? (signal ? 128 : 1), stdout, stderr });
    });
  });
}

/**
 * The first words of a command, for messages (never its data: a secret could be in it). A shell
 * program of ours is named by its $0 (`sh -c PROGRAM unpack ...` is `unpack`).
 */
function describe(argv: string[], where: string): string {
  const words = argv.slice(argv.findIndex((a) => !/^(env|[A-Z_]+=.*)$/.test(a)));
  const name = words[0] === 'sh' && words[1] === '-c' ? words[3] : words.slice(0, 2).join(' ');
  return `${name} on ${where}`;
}

export class LocalHost implements Host, Executor {
  readonly label = 'local';
  readonly $ = templateOn(this);
  constructor(
    private readonly sudo: string[],
    private readonly idleTimeoutMs = DEFAULT_LIMITS.commandIdleTimeoutMs,
  ) {}
  describe(argv: string[]) {
    return describe(argv, 'local');
  }
  exec(argv: string[], opts: RunOptions) {
    const full = opts.sudo ? [...this.sudo, ...argv] : argv;
    const plan = { file: full[0], args: full.slice(1), what: this.describe(argv) };
    return execute(plan, opts, this.idleTimeoutMs, opts.into);
  }
  async close() {}
}

export interface SshOptions {
  configFile?: string;
  sudo: string[];
  signal?: AbortSignal;
  /**
   * restore-verda --new-host: a fresh Verda's new host key is accepted for this run's one
   * connection only (a known_hosts file of its own); the admin's known_hosts is not touched.
   */
  newHost?: boolean;
  /** What to tell an admin whose known_hosts does not accept the host's key (see hostKeyProblem). */
  newHostHint?: string;
  /** COMFYMULTI_SSH_TIMEOUT and COMFYMULTI_COMMAND_TIMEOUT (see lib/config.ts). */
  limits?: Pick<Limits, 'sshTimeoutS' | 'commandIdleTimeoutMs'>;
}

class SshHost implements Host, Executor {
  readonly label: string;
  readonly $ = templateOn(this);
  private constructor(
    readonly destination: string,
    private readonly dir: string,
    private readonly baseArgs: string[],
    private readonly sudo: string[],
    private readonly idleTimeoutMs: number,
    /** The options of a connection of the admin's own (their known_hosts), for checkHostKey. */
    private readonly common: string[],
  ) {
    this.label = `${destination}`;
  }

  /**
   * Opens the one connection of this run. An unreachable host fails within the connect
   * timeout, naming the host and what ssh said.
   */
  static async connect(destination: string, opts: SshOptions): Promise<SshHost> {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'comfymulti-ssh-'));
    fs.chmodSync(dir, 0o700);
    const socket = path.join(dir, 'control');
    const limits = opts.limits ?? DEFAULT_LIMITS;
    const timeout = Math.max(1, Math.ceil(limits.sshTimeoutS));
    // What every connection of the run takes; never StrictHostKeyChecking=no.
    const common = [
      ...(opts.configFile ? ['-F', opts.configFile] : []),
      '-o',
      'BatchMode=yes',
      '-o',
      `ConnectTimeout=${timeout}`,
      // A dead link is noticed within three unanswered keepalives.
      '-o',
      `ServerAliveInterval=${Math.max(1, Math.ceil(timeout / 3))}`,
      '-o',
      'ServerAliveCountMax=3',
    ];
    const firstKey = opts.newHost
      ? ['-o', `UserKnownHostsFile=${path.join(dir, 'known_hosts')}`, '-o', 'StrictHostKeyChecking=accept-new']
      : [];
    const baseArgs = [...common, ...firstKey, '-o', `ControlPath=${socket}`];
    // -f: ssh goes to the background once authenticated, so its exit status says whether the
    // connection stands. ControlPersist bounds an orphaned master if this process is killed -9.
    // `--`: the destination is never read as an option, whatever it holds.
    const { $ } = await import('zx'); // loaded when a connection is made: --help starts without it
    const master = await $({
      quiet: true,
      verbose: false,
      nothrow: true,
      signal: opts.signal,
      timeout: `${timeout + 5}s`,
    })`ssh ${baseArgs} -o ControlMaster=yes -o ControlPersist=120 -f -N -- ${destination}`;
    if (master.exitCode !== 0) {
      fs.rmSync(dir, { recursive: true, force: true });
      const keyProblem = await hostKeyProblem(destination, master.stderr, common, timeout, opts.newHostHint);
      throw new HostError(keyProblem ?? `cannot reach ${destination} over SSH: ${said(master.stderr, 1)}`);
    }
    return new SshHost(destination, dir, baseArgs, opts.sudo, limits.commandIdleTimeoutMs, common);
  }

  async checkHostKey(): Promise<string | undefined> {
    const { $ } = await import('zx');
    const r = await $({
      quiet: true,
      verbose: false,
      nothrow: true,
      timeout: '30s',
    })`ssh ${this.common} -o ControlPath=none -o StrictHostKeyChecking=yes -- ${this.destination} true`;
    if (r.exitCode === 0) return undefined;
    const why = said(r.stderr, 1);
    return /host key|identification/i.test(r.stderr)
      ? `${this.destination} does not present the host key your known_hosts trusts (${why}): the SSH host keys restored are not the ones it had`
      : `${this.destination}: a new connection after the restore failed (${why})`;
  }

  describe(argv: string[]) {
    return describe(argv, this.destination);
  }
  exec(argv: string[], opts: RunOptions) {
    const full = opts.sudo ? [...this.sudo, ...argv] : argv;
    const remote = full.map(shellQuote).join(' ');
    const plan = {
      file: 'ssh',
      args: [...this.baseArgs, '-o', 'ControlMaster=no', '--', this.destination, remote],
      what: this.describe(argv),
    };
    return execute(plan, opts, this.idleTimeoutMs, opts.into);
  }
  async close() {
    const { $ } = await import('zx');
    await $({
      quiet: true,
      verbose: false,
      nothrow: true,
      timeout: '10s',
    })`ssh ${this.baseArgs} -O exit -- ${this.destination}`;
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

/**
 * When ssh refused the host's key: one line that says which key it presents (its fingerprint, by
 * ssh-keyscan) and what to do; undefined for any other failure.
 */
async function hostKeyProblem(
  destination: string,
  stderr: string,
  common: string[],
  timeout: number,
  hint?: string,
): Promise<string | undefined> {
  const changed = /REMOTE HOST IDENTIFICATION HAS CHANGED|Host key for .* has changed/.test(stderr);
  if (!changed && !/Host key verification failed|No \S+ host key is known/.test(stderr)) return undefined;
  const { $ } = await import('zx');
  const quiet = { quiet: true, verbose: false, nothrow: true, timeout: `${timeout + 5}s` } as const;
  // Where ssh goes for this destination (an ssh_config alias included), and the key it is shown there.
  const config = await $(quiet)`ssh ${common} -G -- ${destination}`;
  const get = (key: string) => new RegExp(`^${key} (.+)$`, 'm').exec(config.stdout)?.[1];
  let fingerprint = '';
  const host = get('hostname');
  if (host && !host.startsWith('-')) {
    const scan = await $(quiet)`ssh-keyscan -T ${timeout} -p ${get('port') ?? '22'} -t ed25519,ecdsa,rsa -- ${host}`;
    const listed = await $({ ...quiet, input: scan.stdout })`ssh-keygen -lf -`;
    fingerprint = listed.stdout
      .split('\n')
      .filter(Boolean)
      .map((l) => l.split(' '))
      .map((w) => `${w[w.length - 1]?.replace(/[()]/g, '')} ${w[1]}`)
      .join(', ');
  }
  const what = changed ? 'its host key changed' : 'its host key is not in your known_hosts';
  const presents = fingerprint ? `it presents ${fingerprint}` : 'its key could not be read';
  const todo =
    hint ??
    'if the instance was re-created, restore its host keys (restore-verda.mts), after which it presents the old key again; ' +
      `else check the key on the provider's console and accept it: ssh-keygen -R ${destination}; ssh ${destination}`;
  return `${destination}: ${what} (${presents}): ${todo}`;
}

/** `local` means this machine; anything else is an SSH destination. */
export async function openHost(destination: string, opts: SshOptions): Promise<Host & Executor> {
  return destination === 'local'
    ? new LocalHost(opts.sudo, opts.limits?.commandIdleTimeoutMs)
    : SshHost.connect(destination, opts);
}

/**
 * A host connected on first use, so the plan can be built (and --help, usage errors, a dry
 * run's listing) without a connection. A failed connection is remembered: every step that
 * needs the host fails at once with the same message instead of waiting out the timeout again.
 */
export class LazyHost implements Host, Executor {
  private opening?: Promise<Host & Executor>;
  readonly $ = templateOn(this);
  constructor(
    readonly label: string,
    private readonly open: () => Promise<Host & Executor>,
  ) {}
  private failed = false;
  private async host(): Promise<Host & Executor> {
    this.opening ??= this.open();
    try {
      return await this.opening;
    } catch (e) {
      if (!this.failed || !(e instanceof HostError)) {
        this.failed = true;
        throw e;
      }
      // Said by the first step that needed the host: the others say so in a word.
      const again = new HostError(`not done: ${this.label} cannot be reached (said above)`);
      again.repeat = true;
      throw again;
    }
  }
  describe(argv: string[]) {
    return describe(argv, this.label);
  }
  async exec(argv: string[], opts: RunOptions) {
    return (await this.host()).exec(argv, opts);
  }
  async checkHostKey() {
    return (await this.host()).checkHostKey?.();
  }
  async close() {
    if (this.opening) await (await this.opening.catch(() => undefined))?.close();
  }
}

export function lazyHost(destination: string, opts: SshOptions): LazyHost {
  return new LazyHost(destination, () => openHost(destination, opts));
}
