"""Programs for the tests and the benchmarks (run or imported by them); memdefragd never
imports them."""
