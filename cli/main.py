"""``varreg`` command line entry point."""
import click


@click.group()
@click.version_option(package_name="varreg")
def main():
    """varreg: variational deformable image registration."""


if __name__ == "__main__":
    main()
