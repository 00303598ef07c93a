"""flopwise.coding"""
