// The README and docs/ hold what an admin follows alone, so what they claim mechanically must not
// drift from the code: every `X.mts --flag` they show is a flag of that script (its --help), every
// `Step N: Name` is step N of one of that script's plans (as --dry-run --json and --drill print
// them), and every link and repository path they name exists, in-page anchors included.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, out, runCommand, runScript, tempDir } from './helpers.ts';

const SCRIPTS = ['backup-verda', 'backup-mello', 'backup-cron', 'restore-verda', 'restore-mello'];
const DOCS = ['README.md', ...fs.readdirSync(path.join(ROOT, 'docs')).map((f) => `docs/${f}`)].filter((f) =>
  f.endsWith('.md'),
);
const RUN_LIMIT_MS = 60_000;

const read = (doc: string) => fs.readFileSync(path.join(ROOT, doc), 'utf8');

let work: string;
/** Each script's --help, and ./install's. */
const help = new Map<string, string>();
/** Each script's plans: the step names, in order, of each way it runs (a restore and a drill differ). */
const plans = new Map<string, string[][]>();

test.before(async () => {
  work = tempDir('readme');
  for (const script of SCRIPTS) {
    const r = await runScript(`${script}.mts`, ['--help'], {}, { limitMs: RUN_LIMIT_MS });
    assert.is(r.code, 0, out(r));
    help.set(script, r.stdout);
  }
  const install = await runCommand(path.join(ROOT, 'install'), ['--help'], {}, { limitMs: RUN_LIMIT_MS });
  assert.is(install.code, 0, out(install));
  help.set('install', install.stdout);

  // Every plan is listed whole by --dry-run --json, whatever its steps find: a Verda of empty
  // directories on this machine, an R2 that answers nothing, Mello here.
  const dir = (name: string) => {
    const d = path.join(work, name);
    fs.mkdirSync(d, { recursive: true });
    return d;
  };
  const env = {
    VERDA_HOST: 'local',
    MELLO_HOST: 'local',
    MELLO_SCRIPTS_DIR: dir('mello-scripts'),
    R2_ENDPOINT: 'http://127.0.0.1:9',
    R2_ACCESS_KEY_ID: 'readme',
    R2_SECRET_ACCESS_KEY: 'readme',
    R2_VERSIONS_BUCKET: 'comfy-multi-user-files-versions',
    COMFYMULTI_R2_ATTEMPTS: '1',
    COMFYMULTI_STATE_DIR: dir('state'),
    BACKUP_DIR: dir('backups'),
    MELLO_DATA_DIR: dir('data'),
    SFS_BACKUP_DIR: dir('sfs/backups'),
    SFS_MOUNT: '',
    VERDA_SYSROOT: dir('sys'),
    VERDA_HOME: dir('home/dev'),
    VERDA_PROJECT_DIR: dir('home/dev/comfy-multi'),
    VERDA_MODELS_DIR: dir('sfs/models'),
    VERDA_SUDO: '',
  };
  const ways: [string, string[]][] = [
    ['backup-verda', ['--dry-run']],
    ['backup-mello', ['--dry-run']],
    ['backup-cron', ['--dry-run']],
    ['restore-verda', ['--dry-run']],
    ['restore-verda', ['--drill']],
    ['restore-mello', ['--dry-run']],
    ['restore-mello', ['--drill']],
  ];
  for (const [script, args] of ways) {
    const r = await runScript(`${script}.mts`, [...args, '--json'], env, { limitMs: RUN_LIMIT_MS });
    let steps: { step: number; name: string }[];
    try {
      steps = JSON.parse(r.stdout).steps;
    } catch {
      throw new Error(`${script} ${args.join(' ')} --json gave no summary\n${out(r)}`);
    }
    assert.equal(
      steps.map((s) => s.step),
      steps.map((_, i) => i + 1),
      `${script}: steps numbered from 1`,
    );
    plans.set(script, [...(plans.get(script) ?? []), steps.map((s) => s.name)]);
  }
});

test.after(() => {
  fs.rmSync(work, { recursive: true, force: true });
});

// -------------------------------------------------------------------------------------------
// Flags

/** `./restore-verda.mts --from r2 --dry-run` → the script and the flags shown with it. */
function commandsIn(text: string): { script: string; flags: string[]; line: string }[] {
  const found: { script: string; flags: string[]; line: string }[] = [];
  const names = [...SCRIPTS.map((s) => `${s}\\.mts`), '\\./install'].join('|');
  // The words after the name, up to what ends a command in a line of text or of shell.
  const command = new RegExp(`(?:^|[\\s\`'"(/])(${names})((?:[ \\t]+[^\\s\`#|;&>)]+)*)`, 'gm');
  for (const m of text.matchAll(command)) {
    const script = m[1].replace(/\\?\.mts$/, '').replace(/^\.\//, '');
    const words = m[2].trim().split(/[ \t]+/);
    // A quoted or substituted word ("$(command -v node)") is an argument: the command's own words end there.
    const quoted = words.findIndex((w) => /^["'$]/.test(w));
    const flags = words
      .slice(0, quoted < 0 ? undefined : quoted)
      .filter((w) => /^--?[a-z]/.test(w))
      .map((w) => w.replace(/=.*$/, '').replace(/[,.:;!?]+$/, ''));
    if (flags.length) found.push({ script, flags, line: m[0].trim() });
  }
  return found;
}

const offers = (helpText: string, flag: string) =>
  ['-h', '--help'].includes(flag) ||
  new RegExp(`(^|[\\s\\[|,])${flag.replace(/[-]/g, '\\-')}(?![\\w-])`, 'm').test(helpText);

test('every `X.mts --flag` the README and docs/ show is a flag that script offers in its --help', () => {
  let checked = 0;
  for (const doc of DOCS) {
    for (const { script, flags, line } of commandsIn(read(doc))) {
      for (const flag of flags) {
        assert.ok(offers(help.get(script)!, flag), `${doc}: ${script} has no ${flag} (in "${line}")`);
        checked++;
      }
    }
  }
  assert.ok(checked > 40, `the README shows the scripts' flags (${checked} checked)`);
});

test('the flag check itself: a flag that a script does not offer is found', () => {
  const shown = commandsIn('run `./restore-mello.mts --quick --user u` or ./backup-mello.mts --list > log');
  assert.equal(
    shown.map((c) => [c.script, c.flags]),
    [
      ['restore-mello', ['--quick', '--user']],
      ['backup-mello', ['--list']],
    ],
  );
  assert.not.ok(offers(help.get('restore-mello')!, '--quick'), 'restore-mello does not offer --quick');
  assert.not.ok(offers(help.get('backup-mello')!, '--list'), 'backup-mello does not offer --list');
  assert.ok(offers(help.get('restore-verda')!, '--new-host'));
});

test("each --help: its usage names every flag it describes, and the shared lines are in the script's own words", () => {
  for (const script of SCRIPTS) {
    const text = help.get(script)!;
    const synopsis = text.split('\n\n')[0];
    const described = [...text.matchAll(/^ {2}(?:-\w, )?(--[a-z][\w-]*)/gm)].map((m) => m[1]);
    // --help and --verbose go without saying; --full is the default.
    for (const flag of described.filter((f) => !['--help', '--verbose', '--full'].includes(f)))
      assert.ok(offers(synopsis, flag), `${script}: its usage does not name ${flag}\n${synopsis}`);
  }
  const words: [script: string, not: RegExp][] = [
    ['restore-verda', /backup-cron: its SFS copies|would be sent/],
    ['restore-mello', /the newest backup|would be sent/],
    ['backup-mello', /for backup-verda|backup-cron/],
    ['backup-cron', /for backup-verda|the restore points/],
  ];
  for (const [script, not] of words) assert.not.match(help.get(script)!, not, script);
  assert.match(help.get('restore-verda')!, /--dry-run +say what would be restored and where/);
  // Only backup-mello deletes old versions: restore-mello does not read KEEP_VERSIONS_DAYS.
  assert.match(help.get('backup-mello')!, /^ +KEEP_VERSIONS_DAYS +30$/m);
  assert.not.match(help.get('restore-mello')!, /KEEP_VERSIONS_DAYS/);
});

// -------------------------------------------------------------------------------------------
// Step numbers

/** `Step 12: Models to R2` and `Step 12 (Models to R2 (sent from Verda)):`, with where they are. */
function stepReferences(text: string): { n: number; name: string; at: string }[] {
  const refs: { n: number; name: string; at: string }[] = [];
  for (const m of text.matchAll(/\bStep (\d+): ([^`|,;(\n]+)/g))
    refs.push({ n: Number(m[1]), name: m[2].trim(), at: m[0] });
  for (const m of text.matchAll(/\bStep (\d+) \((.+?)\):/g)) refs.push({ n: Number(m[1]), name: m[2], at: m[0] });
  return refs.filter((r) => r.name);
}

/** Whether some plan of these scripts has step `n` named `name` (or starting with it: a name cut at "("). */
const isStep = (scripts: string[], n: number, name: string) =>
  scripts.some((s) => plans.get(s)!.some((plan) => plan[n - 1] !== undefined && plan[n - 1].startsWith(name)));

test("docs/bash-originals.md: each section's `Step N: Name` is step N of that script", () => {
  const doc = read('docs/bash-originals.md');
  const sections = doc.split(/^## /m).slice(1);
  let checked = 0;
  for (const section of sections) {
    const heading = section.split('\n')[0];
    const script = SCRIPTS.find((s) => heading.includes(`${s}.mts`));
    assert.ok(script, `the section "${heading}" names the script it maps to`);
    for (const ref of stepReferences(section)) {
      assert.ok(
        isStep([script!], ref.n, ref.name),
        `${script}: "${ref.at}" is not its step ${ref.n} (its plans: ${JSON.stringify(plans.get(script!))})`,
      );
      checked++;
    }
  }
  assert.ok(checked >= 30, `the steps of the four scripts are mapped (${checked} checked)`);
});

test("the README's `Step N: Name` lines are step N of a script", () => {
  const refs = stepReferences(read('README.md'));
  for (const ref of refs)
    assert.ok(isStep(SCRIPTS, ref.n, ref.name), `README.md: "${ref.at}" is no script's step ${ref.n}`);
  assert.ok(refs.length > 20, `${refs.length} checked`);
  assert.not.ok(isStep(SCRIPTS, 10, 'Models to R2'), 'the check itself: the models are not backup-verda step 10');
});

// -------------------------------------------------------------------------------------------
// Links and paths

/** GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens. */
const slug = (heading: string) =>
  heading
    .trim()
    .toLowerCase()
    .replace(/[^\p{L}\p{N} _-]/gu, '')
    .replace(/ /g, '-');

function anchors(text: string): Set<string> {
  const seen = new Map<string, number>();
  const found = new Set<string>();
  for (const m of text.replace(/^```[\s\S]*?^```/gm, '').matchAll(/^#{1,6} (.+)$/gm)) {
    const base = slug(m[1]);
    const n = seen.get(base) ?? 0;
    seen.set(base, n + 1);
    found.add(n ? `${base}-${n}` : base);
  }
  return found;
}

test('every link of the README and docs/ leads to a file of the repository or a heading that exists', () => {
  let checked = 0;
  for (const doc of DOCS) {
    const text = read(doc);
    for (const m of text.matchAll(/\]\(([^)\s]+)\)/g)) {
      const target = m[1];
      if (/^(https?|mailto):/.test(target)) continue;
      const [file, anchor] = target.split('#');
      const into = file ? path.join(path.dirname(doc), file) : doc;
      assert.ok(fs.existsSync(path.join(ROOT, into)), `${doc}: the link ${target} leads nowhere`);
      if (anchor) assert.ok(anchors(read(into)).has(anchor), `${doc}: no heading #${anchor} in ${into}`);
      checked++;
    }
  }
  assert.ok(checked > 10, `${checked} links checked`);
});

test('every path of the repository the README and docs/ name in backquotes exists', () => {
  let checked = 0;
  for (const doc of DOCS) {
    for (const m of read(doc).matchAll(/`((?:lib|test|bench|docs|scripts|demo|\.ci)\/[\w./-]+)`/g)) {
      const name = m[1];
      // Patterns (`lib/sh/*.sh`, `test/*NAME*`) are not one file; `lib/ufw/user.rules` is Verda's.
      if (/[*]|NAME/.test(name) || name.startsWith('lib/ufw/')) continue;
      assert.ok(fs.existsSync(path.join(ROOT, name)), `${doc}: ${name} does not exist`);
      checked++;
    }
  }
  assert.ok(checked > 40, `${checked} paths checked`);
});

test.run();
