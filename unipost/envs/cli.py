"""``unipost env``: run the scripted expert on embedded tasks, and show a task with its expert trajectory."""

from __future__ import annotations

import json

import typer

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="The embedded mini software-engineering world."
)

_DIFFICULTY_HELP = "easy | medium | hard | expert | marathon, or 'mixed' to cycle through them"


def _difficulty_for(difficulty: str, i: int) -> str:
    from unipost.envs.embedded.tasks import DIFFICULTIES

    if difficulty == "mixed":
        names = list(DIFFICULTIES)
        return names[i % len(names)]
    if difficulty not in DIFFICULTIES:
        raise typer.BadParameter(f"unknown difficulty {difficulty!r}; {_DIFFICULTY_HELP}")
    return difficulty


@app.command()
def expert(
    split: str = typer.Option("heldout", help="train or heldout"),
    n: int = typer.Option(10, help="number of tasks (indices 0..n-1)"),
    perturb: int = typer.Option(0, help="random or deliberately wrong actions before the expert takes over"),
    seed: int = typer.Option(0, help="seed of the perturbations"),
    difficulty: str = typer.Option("mixed", help=_DIFFICULTY_HELP),
    unsafe_local: bool = typer.Option(False, help="run without bubblewrap (trusted policies only)"),
) -> None:
    """Run the scripted expert on N tasks and print `resolved: R/N`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from unipost.envs.embedded.episode import play_split

    if n < 1:
        raise typer.BadParameter("--n must be >= 1")
    resolved, turns, modes = 0, [], {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        bar = progress.add_task(f"expert on {split}", total=n)
        for i in range(n):
            _, traj = play_split(
                split,
                i,
                _difficulty_for(difficulty, i),
                perturb=perturb,
                seed=seed,
                unsafe_local=unsafe_local,
            )
            resolved += traj.outcome.resolved
            turns.append(len(traj.turns))
            if not traj.outcome.resolved:
                modes[traj.outcome.failure_mode] = modes.get(traj.outcome.failure_mode, 0) + 1
            progress.update(bar, advance=1, description=f"expert on {split} (resolved {resolved})")
    typer.echo(f"turns: min {min(turns)}, mean {sum(turns) / len(turns):.1f}, max {max(turns)}")
    if modes:
        typer.echo(f"failure modes: {modes}")
    typer.echo(f"resolved: {resolved}/{n}")


@app.command()
def show(
    split: str = typer.Option("heldout", help="train or heldout"),
    index: int = typer.Option(0, help="task index within the split"),
    difficulty: str = typer.Option("medium", help=_DIFFICULTY_HELP),
    unsafe_local: bool = typer.Option(False, help="run without bubblewrap (trusted policies only)"),
) -> None:
    """Print a task's issue text, its files and the expert's trajectory."""
    from rich.console import Console
    from rich.rule import Rule
    from rich.syntax import Syntax

    from unipost.envs.embedded.episode import play_split

    console = Console()
    task, traj = play_split(split, index, _difficulty_for(difficulty, index), unsafe_local=unsafe_local)
    console.print(Rule(f"{task.task_id}: issue"))
    console.print(task.issue, markup=False)
    for path, text in task.files.items():
        console.print(Rule(f"/testbed/{path}"))
        console.print(Syntax(text, "python", line_numbers=True))
    console.print(Rule("expert trajectory"))
    for turn in traj.turns:
        call = turn.action["tool_calls"][0]["function"]
        args = json.loads(call["arguments"])
        console.print(f"[bold]turn {turn.index}[/bold] {turn.action.get('content', '')}", highlight=False)
        console.print(f"  -> {call['name']} {json.dumps(args)[:300]}", markup=False)
        for obs in turn.observation:
            console.print("     " + obs["content"][:600].replace("\n", "\n     "), markup=False)
    console.print(Rule("outcome"))
    console.print(traj.outcome.model_dump_json(), markup=False)
