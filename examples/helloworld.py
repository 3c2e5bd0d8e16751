"""Wrapper: the examples ship inside the package (python -m adaptmoe.examples.helloworld)."""
from adaptmoe.examples.helloworld import main

if __name__ == "__main__":
    main()
