"""``srtrain``: the trainer's command line. Training lands with the trainer issue; until then
this group has no command that could be mistaken for training."""
import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="srpipe")
def main():
    """Train super-resolution models from srpipe databases (not available yet: this
    release packs data with `srdata pack`; the trainer is the next milestone)."""


if __name__ == "__main__":
    main()
