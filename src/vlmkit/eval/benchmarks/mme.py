"""(filled in by issue 21)"""
